"""Which weights exist on disk, and how to make or fetch them.

Layout under the weights folder (one diffusers folder each, a ``spillway.json`` marker
saying where it came from):

    sdxl-turbo/          real weights from the Hugging Face Hub (fp16 variant)
    sdxl-turbo-random/   the real architecture with random weights (GPU benchmarks)
    sdxl-turbo-tiny/     the tiny built-in default: same classes, random weights

The public model id is ``sdxl-turbo`` whichever folder serves it: client code keeps
``model="sdxl-turbo"`` when real weights arrive.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from pipelines.sdxl_random import Size

MODEL_ID = "sdxl-turbo"
HUB_REPO = "stabilityai/sdxl-turbo"
MARKER = "spillway.json"

Source = Literal["hub", "random-full", "tiny"]
FOLDERS: dict[Source, str] = {
    "hub": "sdxl-turbo",
    "random-full": "sdxl-turbo-random",
    "tiny": "sdxl-turbo-tiny",
}
PREFERENCE: tuple[Source, ...] = ("hub", "random-full", "tiny")
# Only what the fp16 pipeline needs: no pickles, no fp32 duplicates, no ONNX.
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.txt", "*/*.json",
                "*/*.fp16.safetensors"]


class FetchError(RuntimeError):
    """A download that could not happen, said in one sentence."""


@dataclass(frozen=True)
class WeightsInfo:
    model_id: str
    source: Source
    path: Path
    variant: str | None = None

    @property
    def label(self) -> str:
        return HUB_REPO if self.source == "hub" else f"{self.source} (random weights)"


def _read(folder: Path, source: Source) -> WeightsInfo | None:
    if not (folder / "model_index.json").is_file():
        return None
    meta: dict[str, str] = {}
    if (folder / MARKER).is_file():
        meta = json.loads((folder / MARKER).read_text())
    found = meta.get("source")
    return WeightsInfo(MODEL_ID, found if found in FOLDERS else source,
                       folder, meta.get("variant"))


def describe(folder: Path) -> WeightsInfo:
    """A folder named in settings: its marker says what it is; unmarked means real weights."""
    info = _read(folder, "hub")
    if info is None:
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline (no model_index.json)")
    return info


def list_weights(weights_dir: Path) -> list[WeightsInfo]:
    """Every weights folder present, best first."""
    found = (_read(weights_dir / FOLDERS[src], src) for src in PREFERENCE)
    return [info for info in found if info is not None]


def best_weights(weights_dir: Path) -> WeightsInfo | None:
    present = list_weights(weights_dir)
    return present[0] if present else None


def _save(pipe: object, target: Path, source: Source, variant: str | None = None) -> WeightsInfo:
    """Write to a sibling temp folder, then rename: a crash never leaves half a model."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True, variant=variant)  # type: ignore[attr-defined]
    _mark(tmp, source, variant)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return WeightsInfo(MODEL_ID, source, target, variant)


def _mark(folder: Path, source: Source, variant: str | None) -> None:
    meta = {"model": MODEL_ID, "source": source, "variant": variant,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (folder / MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def build_tiny(weights_dir: Path) -> WeightsInfo:
    from pipelines.sdxl_random import build_sdxl

    return _save(build_sdxl("tiny"), weights_dir / FOLDERS["tiny"], "tiny")


def ensure_default(weights_dir: Path) -> WeightsInfo:
    """The best weights present, building the tiny model when there are none."""
    return best_weights(weights_dir) or build_tiny(weights_dir)


def build_random_full(weights_dir: Path, device: str = "auto",
                      size: Size = "full") -> WeightsInfo:
    """The real SDXL-Turbo architecture with random weights, saved as the fp16 variant
    (``size="tiny"`` takes the same path with the tiny configs, for tests)."""
    from pipelines.base import pick_device
    from pipelines.sdxl_random import build_sdxl

    dev = pick_device(device)
    pipe = build_sdxl(size, dtype=torch.float16, device=dev)
    return _save(pipe, weights_dir / FOLDERS["random-full"], "random-full", variant="fp16")


def fetch(model_id: str, weights_dir: Path, endpoint: str | None = None) -> WeightsInfo:
    """Download the real weights with huggingface_hub (needs a network)."""
    if model_id != MODEL_ID:
        raise FetchError(f"unknown model {model_id!r}: the only fetchable model is {MODEL_ID!r}")
    from huggingface_hub import snapshot_download

    target = weights_dir / FOLDERS["hub"]
    tmp = target.with_name(target.name + ".partial")
    try:
        snapshot_download(repo_id=HUB_REPO, local_dir=str(tmp), allow_patterns=HUB_PATTERNS,
                          endpoint=endpoint)
    except Exception as exc:  # any failure ends in the same one-sentence answer
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FetchError(
            f"could not download {HUB_REPO} from the Hugging Face Hub ({reason}); "
            f"on a machine without hub access, copy a diffusers SDXL-Turbo folder "
            f"into {target} instead") from exc
    _mark(tmp, "hub", "fp16")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return WeightsInfo(MODEL_ID, "hub", target, "fp16")
