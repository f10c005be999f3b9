"""What a run is made of: its errors, one good input Row, one Output image of it, and the
BulkSummary it ends with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class BulkError(Exception):
    """The run cannot go on (bad input file, output folder busy or unwritable)."""


class BulkInputError(BulkError):
    """The input file as a whole is unusable; raised before any work is done."""


@dataclass(frozen=True)
class Row:
    """One good input row; it makes ``len(seeds)`` images."""

    line: int
    input: dict[str, Any]
    prompt: str
    size: str | None  # "WxH" as asked; None: the default size
    width: int | None  # None only in server mode without a size: the server decides
    height: int | None
    steps: int | None
    quality: str | None
    model: str | None
    seeds: tuple[int, ...]
    files: tuple[str, ...]  # relative to the output folder, posix
    fmt: str


@dataclass(frozen=True)
class Output:
    row: Row
    index: int  # 1-based

    @property
    def seed(self) -> int:
        return self.row.seeds[self.index - 1]

    @property
    def file(self) -> str:
        return self.row.files[self.index - 1]


@dataclass
class BulkSummary:
    written: int = 0  # images made this run
    skipped: int = 0  # already in the manifest with their file present
    bad_rows: int = 0  # input rows rejected before any work
    failed: int = 0  # images that could not be made (server refusal, pipeline error)
    wall_s: float = 0.0
    cost_usd: float = 0.0
    cloud_cost_usd: float = 0.0  # what the written images would have cost all-cloud
    cloud_provider: str = "openai"
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.written / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        return (f"{self.written} image(s) written, {self.skipped} skipped (already done), "
                f"{self.bad_rows} bad row(s), {self.failed} failed; "
                f"{self.wall_s:.1f} s, {self.images_per_s:.2f} images/s; "
                f"cost ${self.cost_usd:.4f} (all-cloud on {self.cloud_provider}: "
                f"${self.cloud_cost_usd:.4f})")
