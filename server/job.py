"""Jobs: what every endpoint turns its wire request into, and every provider runs."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.base import ImageItem


@dataclass(frozen=True)
class ImageJob:
    model: str
    prompt: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    quality: str = "auto"
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    user: str | None = None

    @property
    def n(self) -> int:
        return len(self.seeds)

    def items(self) -> list[ImageItem]:
        return [ImageItem(self.prompt, seed, self.width, self.height, self.steps)
                for seed in self.seeds]
