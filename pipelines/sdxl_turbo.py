"""SDXL-Turbo text-to-image: load from a local folder, run one batched call per batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForText2Image,
    StableDiffusionXLPipeline,
)
from PIL import Image

from pipelines.base import ImageItem, pick_dtype

log = logging.getLogger(__name__)

MIN_STEPS, MAX_STEPS = 1, 4


@dataclass(frozen=True)
class Limits:
    """What the pipeline accepts; the server checks requests against the same numbers."""

    min_side: int = 256
    max_side: int = 1024
    multiple: int = 8


def check_item(item: ImageItem, limits: Limits) -> None:
    """Raise ValueError naming the bad value; the server maps it to a 400."""
    for name, side in (("width", item.width), ("height", item.height)):
        if not limits.min_side <= side <= limits.max_side:
            raise ValueError(
                f"{name} {side} is outside {limits.min_side}..{limits.max_side}")
        if side % limits.multiple:
            raise ValueError(f"{name} {side} is not a multiple of {limits.multiple}")
    if not MIN_STEPS <= item.steps <= MAX_STEPS:
        raise ValueError(f"steps {item.steps} is outside {MIN_STEPS}..{MAX_STEPS}")
    if item.guidance != 0.0:
        raise ValueError(f"guidance {item.guidance} is not supported: SDXL-Turbo runs at 0")
    if item.init_image is not None:
        if not 0.0 < item.strength <= 1.0:
            raise ValueError(f"strength {item.strength} is outside (0, 1]")
        if item.steps * item.strength < 1.0:
            raise ValueError(f"steps x strength = {item.steps} x {item.strength} is below 1: "
                             "no denoising step would run")
        if item.init_image.size != (item.width, item.height):
            raise ValueError(f"source image is {item.init_image.size}, "
                             f"not {(item.width, item.height)}")


class SDXLTurbo:
    """An SDXL pipeline folder (diffusers layout) on one device.

    ``text2img`` makes ONE pipeline call for the whole batch, with one
    ``torch.Generator`` per item, so each item's latent noise depends only on its
    seed, never on its neighbours in the batch.
    """

    def __init__(self, pipe: StableDiffusionXLPipeline, device: torch.device,
                 limits: Limits = Limits()) -> None:
        self.pipe = pipe
        # Same modules, no copy: image-to-image shares the text-to-image weights.
        self.img2img_pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        self.img2img_pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.limits = limits
        self.attention = "sdpa"

    @classmethod
    def load(cls, folder: str | Path, device: torch.device, *, variant: str | None = None,
             xformers: bool = False, limits: Limits = Limits()) -> SDXLTurbo:
        # 1. Load: safetensors only (a pickle is code), never a network call.
        dtype = pick_dtype(device)
        pipe = AutoPipelineForText2Image.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, variant=variant,
            local_files_only=True)
        if not isinstance(pipe, StableDiffusionXLPipeline):
            raise ValueError(f"{folder} holds a {type(pipe).__name__}, not an SDXL pipeline")
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        engine = cls(pipe, device, limits)
        # 2. Attention: PyTorch SDPA is diffusers' default; xformers only when asked for.
        if xformers:
            engine.enable_xformers()
        return engine

    def enable_xformers(self) -> None:
        try:
            self.pipe.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError, RuntimeError) as exc:
            log.warning("xformers requested but unavailable (%s); staying on SDPA", exc)
            return
        self.attention = "xformers"

    def run(self, items: list[ImageItem]) -> list[Image.Image]:
        """One batch of one kind, as the batcher forms them."""
        if items and items[0].kind == "img2img":
            return self.img2img(items)
        return self.text2img(items)

    def text2img(self, items: list[ImageItem]) -> list[Image.Image]:
        return self._call(self.pipe, items, {})

    def img2img(self, items: list[ImageItem]) -> list[Image.Image]:
        if any(item.init_image is None for item in items):
            raise ValueError("img2img needs a source image for every item")
        strength = items[0].strength if items else 0.0
        return self._call(self.img2img_pipe, items,
                          {"image": [item.init_image for item in items], "strength": strength})

    @torch.inference_mode()
    def _call(self, pipe: StableDiffusionXLPipeline, items: list[ImageItem],
              extra: dict[str, object]) -> list[Image.Image]:
        if not items:
            return []
        # 1. One shape per call: the batcher only groups compatible items.
        first = items[0]
        if any(item.shape_key != first.shape_key for item in items):
            raise ValueError(f"{first.kind} batch mixes sizes, steps, guidance or strength")
        for item in items:
            check_item(item, self.limits)
        # 2. One generator per item, on the device that draws the noise.
        generators = [torch.Generator(self.device).manual_seed(item.seed) for item in items]
        # 3. One batched call.
        out = pipe(
            prompt=[item.prompt for item in items],
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=generators,
            output_type="pil",
            **extra,
        )
        images: list[Image.Image] = list(out.images)
        # 4. Outputs match inputs one to one, or the whole batch fails.
        if len(images) != len(items):
            raise RuntimeError(f"pipeline returned {len(images)} images for {len(items)} items")
        return images
