"""Job items shared by the pipelines, and the device/dtype choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

VaeChoice = Literal["full", "tiny"]
VAE_CHOICES: tuple[VaeChoice, ...] = ("full", "tiny")
ShapeKey = tuple[str, int, int, int, float, float, str]
Picture = np.ndarray  # one made image: height x width x 3, uint8
def vae_choices(tiny: bool) -> tuple[VaeChoice, ...]:
    """The decoders a request may ask for: the model's own, and the tiny one if loaded."""
    return ("full", "tiny") if tiny else ("full",)


DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16,
                                  "fp32": torch.float32}


class NotFinite(RuntimeError):
    """One item decoded to NaN or infinite pixels, also when decoded again in fp32: it
    fails on its own (a black picture is never sent as a success); its batch-mates keep
    their images."""


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
    # which decoder turns latents into pixels: the model's own VAE, or the tiny one
    # (TAESDXL: several times faster, a little softer)
    vae: VaeChoice = "full"
    # inpainting: which pixels of the source to repaint (mode "L", width x height, 255 =
    # repaint); the rest of the source comes back as it was
    mask: Image.Image | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        if self.init_image is None:
            return "text2img"
        return "img2img" if self.mask is None else "inpaint"

    @property
    def shape_key(self) -> ShapeKey:
        """Items with equal keys can share one pipeline call (one decoder per call)."""
        return (self.kind, self.width, self.height, self.steps, self.guidance, self.strength,
                self.vae)

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


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """``auto``: bf16 on a CUDA device that has it (fp32's range, so the SDXL VAE decodes
    without an fp32 upcast), else fp16 there; fp32 on the CPU (half-precision convolutions
    are slow there). ``bf16``, ``fp16`` and ``fp32`` are taken as given."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
