"""Job items shared by the pipelines, and the device/dtype choice."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass(frozen=True)
class ImageItem:
    """One image to make. A request with ``n`` images contributes ``n`` items."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float = 0.0
    # image-to-image: the source picture (already width x height) and how far to move from it
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)
    strength: float = 0.0

    @property
    def kind(self) -> str:
        return "text2img" if self.init_image is None else "img2img"

    @property
    def shape_key(self) -> tuple[str, int, int, int, float, float]:
        """Items with equal keys can share one pipeline call."""
        return (self.kind, self.width, self.height, self.steps, self.guidance, self.strength)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU; anything else is taken as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for but CUDA is not available")
    return device


def pick_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (SDXL-Turbo ships fp16 weights), fp32 on CPU (fp16 conv is slow there)."""
    return torch.float16 if device.type == "cuda" else torch.float32
