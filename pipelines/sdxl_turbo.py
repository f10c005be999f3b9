"""SDXL-Turbo text-to-image and image-to-image: load from a local folder, run one batched
call per batch, decode and postprocess on the device."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    StableDiffusionXLPipeline,
)
from PIL import Image

from pipelines.base import (
    ImageItem,
    NotFinite,
    Picture,
    ShapeKey,
    VaeChoice,
    pick_dtype,
    vae_choices,
)
from pipelines.buckets import Bucket, plan_chunks
from pipelines.compiled import Compiled
from pipelines.postprocess import copy_out, finite_rows, to_uint8, unscale

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
    if item.mask is not None and (item.init_image is None or item.mask.mode != "L"
                                  or item.mask.size != (item.width, item.height)):
        raise ValueError("a mask needs a source image, and is mode L at the item's size")


def keep_unmasked(picture: Picture | NotFinite, item: ImageItem) -> Picture | NotFinite:
    """An inpainted picture with the source's own pixels outside the mask: the VAE's
    round trip would otherwise shift them a little (and the tiny random one a lot)."""
    if isinstance(picture, NotFinite) or item.init_image is None or item.mask is None:
        return picture
    source = np.asarray(item.init_image.convert("RGB"), dtype=np.uint8)
    repaint = np.asarray(item.mask, dtype=np.uint8)[..., None] > 127
    return np.where(repaint, picture, source).astype(np.uint8)


def check_dtypes(modules: dict[str, Any], dtype: torch.dtype) -> None:
    """Every weight in the dtype asked for, or a RuntimeError naming the component: a
    diffusers before 0.40 ignores ``dtype=`` and silently loads fp32."""
    for name, module in modules.items():
        found = {p.dtype for p in module.parameters()}
        if found != {dtype}:
            got = ", ".join(sorted(str(d).removeprefix("torch.") for d in found))
            raise RuntimeError(f"{name} loaded as {got}, not "
                               f"{str(dtype).removeprefix('torch.')}")


def _pictures(batch: np.ndarray) -> list[Picture]:
    return [np.ascontiguousarray(row) for row in batch]


class SDXLTurbo:
    """An SDXL pipeline folder (diffusers layout) on one device.

    One pipeline call per batch, with one ``torch.Generator`` per item, so each item's
    latent noise depends only on its seed, never on its neighbours in the batch. The
    pipeline stops at latents; decoding, the finite check and the uint8 conversion run on
    the device, and the host gets one uint8 array per batch.

    ``upcast``: fp16 with the stock SDXL VAE, which overflows in fp16: it decodes in fp32
    (diffusers' rule). bf16 has fp32's range, so a bf16 VAE decodes as it is.
    """

    def __init__(self, pipe: StableDiffusionXLPipeline, device: torch.device,
                 limits: Limits = Limits(), *, tiny_vae: Any | None = None,
                 upcast: bool = False) -> None:
        self.pipe = pipe
        # Same modules, no copy: image-to-image shares the text-to-image weights.
        self.img2img_pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        self.img2img_pipe.set_progress_bar_config(disable=True)
        # Inpainting shares the loaded weights too (SDXL-Turbo's UNet has 4 input
        # channels: the pipeline blends the source's latents in outside the mask).
        self.inpaint_pipe = AutoPipelineForInpainting.from_pipe(pipe)
        self.inpaint_pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.limits = limits
        self.attention = "sdpa"
        self.dtype: torch.dtype = pipe.unet.dtype
        self.vaes: dict[str, Any] = {"full": pipe.vae}
        if tiny_vae is not None:
            self.vaes["tiny"] = tiny_vae
        self.upcast = upcast
        self.compiled: Compiled | None = None
        # Memory: most items per call, per shape (learnt at warm-up, halved on an OOM).
        self.max_items: dict[ShapeKey, int] = {}
        self.bytes_per_pixel: float | None = None
        self.free_bytes: int | None = None

    @classmethod
    def load(cls, folder: str | Path, device: torch.device, *, variant: str | None = None,
             dtype: str = "auto", xformers: bool = False, limits: Limits = Limits(),
             tiny_vae: str | Path | None = None, fp16_vae: str | Path | None = None,
             tune: bool | None = None) -> SDXLTurbo:
        # 1. Load: safetensors only (a pickle is code), never a network call.
        torch_dtype = pick_dtype(device, dtype)
        local = {"use_safetensors": True, "local_files_only": True}
        extra: dict[str, Any] = {}
        upcast = False
        if torch_dtype == torch.float16:
            if fp16_vae is not None:  # madebyollin/sdxl-vae-fp16-fix: finite in fp16
                extra["vae"] = AutoencoderKL.from_pretrained(str(fp16_vae), dtype=torch_dtype,
                                                             **local)
            else:
                upcast = True
                log.warning("fp16 without the fp16-fix VAE: every decode runs in fp32 "
                            "(slower); bf16, or `spillway weights fetch sdxl-turbo` for the "
                            "fix, avoids it")
        pipe = AutoPipelineForText2Image.from_pretrained(
            str(folder), dtype=torch_dtype, variant=variant, **local, **extra)
        if not isinstance(pipe, StableDiffusionXLPipeline):
            raise ValueError(f"{folder} holds a {type(pipe).__name__}, not an SDXL pipeline")
        # fp32's range: no per-call fp32 round trip when image-to-image encodes its source.
        pipe.vae.register_to_config(force_upcast=upcast)
        tiny = None if tiny_vae is None else AutoencoderTiny.from_pretrained(
            str(tiny_vae), dtype=torch_dtype, **local)
        # 2. Every weight in the dtype asked for: a wrong one is an error, not a slow box.
        components = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
                      "text_encoder_2": pipe.text_encoder_2}
        check_dtypes({**components, **({"tiny_vae": tiny} if tiny is not None else {})},
                     torch_dtype)
        pipe.to(device)
        if tiny is not None:
            tiny.to(device)
        pipe.set_progress_bar_config(disable=True)
        engine = cls(pipe, device, limits, tiny_vae=tiny, upcast=upcast)
        # 3. Attention: PyTorch SDPA is diffusers' default; xformers only when asked for.
        if xformers:
            engine.enable_xformers()
        if tune if tune is not None else device.type == "cuda":
            engine.tune()
        return engine

    @property
    def vae_choices(self) -> tuple[VaeChoice, ...]:
        return vae_choices("tiny" in self.vaes)

    def enable_xformers(self) -> None:
        try:
            self.pipe.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError, RuntimeError) as exc:
            log.warning("xformers requested but unavailable (%s); staying on SDPA", exc)
            return
        self.attention = "xformers"

    def tune(self) -> None:
        """Kernels for the device: channels-last convolutions, one fused QKV projection per
        attention (unless xformers owns attention), cuDNN autotuning, TF32 for what stays
        fp32. Same pictures within rounding (tests/unit/pipelines/test_engine_kernels.py)."""
        self.pipe.unet.to(memory_format=torch.channels_last)
        for vae in self.vaes.values():
            vae.to(memory_format=torch.channels_last)
        if self.attention != "xformers":
            self.pipe.fuse_qkv_projections(unet=True, vae=True)
            self.attention = "sdpa, fused qkv"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    # -- compiled buckets ------------------------------------------------------------
    def compile(self, buckets: list[Bucket], *, mode: str | None = None,
                backend: str | Callable[..., Any] = "inductor"
                ) -> list[tuple[Bucket, str, float]]:
        """Compile the UNet and the decoders and warm every bucket with every decoder now,
        so no request ever waits for a compilation. Returns (bucket, vae, seconds)."""
        import time

        vaes = {name: vae for name, vae in self.vaes.items()
                if not (name == "full" and self.upcast)}  # the upcast decode stays eager
        self.compiled = Compiled(self.pipe.unet, vaes, mode=mode, backend=backend)
        self.compiled.allow(len(buckets) * len(self.vaes))
        took = []
        for bucket in buckets:
            for vae in self.vaes:
                started = time.perf_counter()
                self.compiled.warm.add((bucket.width, bucket.height, bucket.batch, vae))
                self._one_call([ImageItem("warm-up", i, bucket.width, bucket.height, 1,
                                          vae=vae)  # type: ignore[arg-type]
                                for i in range(bucket.batch)])
                took.append((bucket, vae, time.perf_counter() - started))
        return took

    # -- memory ----------------------------------------------------------------------
    def measure_memory(self, width: int, height: int, batch: int) -> None:
        """CUDA: peak bytes per pixel of a batch, and what is free, so no batch is formed
        that cannot fit (``cap``). Elsewhere nothing is learnt and batches are not split."""
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        self._one_call([ImageItem("warm-up", i, width, height, 1) for i in range(batch)])
        per_item = (torch.cuda.max_memory_allocated() - base) / batch
        self.bytes_per_pixel = max(self.bytes_per_pixel or 0.0, per_item / (width * height))
        free, _ = torch.cuda.mem_get_info()
        # The allocator keeps what the batch used: that room holds `batch` items again.
        self.free_bytes = int(free + (torch.cuda.max_memory_allocated() - base))

    def cap(self, key: ShapeKey, width: int, height: int) -> int:
        learnt = self.max_items.get(key)
        if learnt is not None:
            return learnt
        if self.bytes_per_pixel and self.free_bytes:
            return max(1, int(0.85 * self.free_bytes / (self.bytes_per_pixel * width * height)))
        return 1 << 30

    # -- running ---------------------------------------------------------------------
    def generate(self, items: list[ImageItem]) -> list[Picture | NotFinite]:
        """One batch of one shape, as the batcher forms them: uint8 pictures, or NotFinite
        for an item whose pixels are not finite even in fp32."""
        if not items:
            return []
        # 1. One shape per batch: the batcher only groups compatible items.
        first = items[0]
        if any(item.shape_key != first.shape_key for item in items):
            raise ValueError(f"{first.kind} batch mixes sizes, steps, guidance, strength "
                             "or VAE")
        for item in items:
            check_item(item, self.limits)
        if first.vae not in self.vaes:
            raise ValueError(f"vae {first.vae!r} is not loaded")
        # 2. Calls of compiled sizes (padded) and within the memory budget.
        key = first.shape_key
        cap = self.cap(key, first.width, first.height)
        sizes = (self.compiled.sizes(first.width, first.height, first.vae)
                 if self.compiled is not None else [])
        out: list[Picture | NotFinite] = []
        start = 0
        for count, padded in plan_chunks(len(items), sizes, cap):
            chunk = items[start:start + count]
            start += count
            try:
                out.extend(self._one_call(chunk + [chunk[-1]] * (padded - count))[:count])
            except torch.cuda.OutOfMemoryError:
                # Only this batch fails; the next of this shape is split in half.
                self.max_items[key] = max(1, min(cap, padded) // 2)
                log.warning("out of device memory at %d x %s; at most %d items per call now",
                            padded, key, self.max_items[key])
                torch.cuda.empty_cache()
                raise
        return out

    def run(self, items: list[ImageItem]) -> list[Image.Image]:
        """``generate`` as PIL images, for callers in this process (CLI, bulk, bench); an
        item that is not finite fails the call."""
        pictures = self.generate(items)
        for p in pictures:
            if isinstance(p, NotFinite):
                raise p
        return [Image.fromarray(p) for p in pictures if not isinstance(p, NotFinite)]

    def text2img(self, items: list[ImageItem]) -> list[Image.Image]:
        if any(item.init_image is not None for item in items):
            raise ValueError("text2img items carry no source image")
        return self.run(items)

    def img2img(self, items: list[ImageItem]) -> list[Image.Image]:
        if any(item.init_image is None for item in items):
            raise ValueError("img2img needs a source image for every item")
        return self.run(items)

    @contextmanager
    def _unet(self, pipe: StableDiffusionXLPipeline, compiled: bool) -> Iterator[None]:
        if not compiled or self.compiled is None:
            yield
            return
        eager = pipe.unet
        pipe.unet = self.compiled.unet
        try:
            yield
        finally:
            pipe.unet = eager

    @torch.inference_mode()
    def _one_call(self, items: list[ImageItem]) -> list[Picture | NotFinite]:
        first = items[0]
        compiled = self.compiled is not None and self.compiled.has(
            first.width, first.height, len(items), first.vae)
        # 1. One generator per item, on the device that draws the noise (eagerly).
        generators = [torch.Generator(self.device).manual_seed(item.seed) for item in items]
        pipe, extra = self.pipe, {}
        if first.kind == "img2img":
            pipe = self.img2img_pipe
            extra = {"image": [item.init_image for item in items], "strength": first.strength}
        elif first.kind == "inpaint":
            pipe = self.inpaint_pipe
            extra = {"image": [item.init_image for item in items],
                     "mask_image": [item.mask for item in items], "strength": first.strength}
        # 2. One batched call, up to the latents.
        with self._unet(pipe, compiled):
            latents = pipe(prompt=[item.prompt for item in items], width=first.width,
                           height=first.height, num_inference_steps=first.steps,
                           guidance_scale=first.guidance, generator=generators,
                           output_type="latent", **extra).images
        if latents.shape[0] != len(items):
            raise RuntimeError(f"pipeline returned {latents.shape[0]} latents for "
                               f"{len(items)} items")
        # 3. Decode, check, convert on the device; one copy out.
        pictures = self._decode(latents, first.vae, compiled)
        if first.kind == "inpaint":
            pictures = [keep_unmasked(p, item) for p, item in zip(pictures, items, strict=True)]
        return pictures

    def _decode(self, latents: torch.Tensor, vae_name: str, compiled: bool
                ) -> list[Picture | NotFinite]:
        vae = self.vaes[vae_name]
        upcast = self.upcast and vae_name == "full"
        if upcast:
            images = self._decode_fp32(vae, latents)
        elif compiled and self.compiled is not None:
            images = self.compiled.decoders[vae_name](
                unscale(latents, vae).to(vae.dtype).contiguous())
        else:
            images = vae.decode(unscale(latents, vae).to(vae.dtype), return_dict=False)[0]
        pixels = to_uint8(images)
        finite = finite_rows(images)
        bad = (~finite).nonzero().flatten().tolist()  # the one sync before the copy
        if bad and images.dtype != torch.float32:
            log.warning("%d of %d items decoded to NaN/inf in %s; decoding them in fp32",
                        len(bad), len(images), images.dtype)
            again = self._decode_fp32(vae, latents[bad], in_place=False)
            pixels[bad] = to_uint8(again)
            finite[bad] = finite_rows(again)
            bad = (~finite).nonzero().flatten().tolist()
        host = _pictures(copy_out(pixels))
        return [NotFinite(f"item {i} of the batch decoded to NaN or infinite pixels")
                if i in bad else p for i, p in enumerate(host)]

    def _decode_fp32(self, vae: Any, latents: torch.Tensor, *, in_place: bool = True
                     ) -> torch.Tensor:
        """A decode in fp32. ``in_place``: the VAE's own weights cast there and back (fp16
        with the stock VAE, as diffusers does it, eager). Otherwise an fp32 copy for this
        decode only (the NaN path, rare): a compiled graph keeps the weights it was
        captured with, addresses included under CUDA graphs."""
        if not in_place:
            vae = copy.deepcopy(vae).to(dtype=torch.float32)
            out: torch.Tensor = vae.decode(unscale(latents.float(), vae), return_dict=False)[0]
            return out
        dtype = vae.dtype
        vae.to(dtype=torch.float32)
        try:
            out = vae.decode(unscale(latents.float(), vae), return_dict=False)[0]
        finally:
            vae.to(dtype=dtype)
        return out
