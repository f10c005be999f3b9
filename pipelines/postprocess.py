"""Latents to uint8 pixels, on the device: decode, check finite, clamp, scale, one copy out.

diffusers' own path (``output_type="pil"``) moves fp32 pixels to the host and makes PIL
images there, in the thread that drives the device; here the host gets one uint8 array per
batch (a quarter of fp32's bytes) through pinned memory, and the encoder takes it as is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def unscale(latents: torch.Tensor, vae: Any) -> torch.Tensor:
    """What the UNet's latents are in the VAE's own scale (diffusers' rule, mean/std when
    the VAE's config has them)."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        out: torch.Tensor = latents * s / cfg.scaling_factor + m
        return out
    plain: torch.Tensor = latents / cfg.scaling_factor
    return plain


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW floats -> NHWC uint8, rounded as diffusers' ``numpy_to_pil`` rounds.
    One fp32 temporary, worked in place (a pass per step, no allocation per step)."""
    scaled = images.float().div(2).add_(0.5).clamp_(0, 1).mul_(255).round_()
    return scaled.permute(0, 2, 3, 1).to(torch.uint8, memory_format=torch.contiguous_format)


def finite_rows(images: torch.Tensor) -> torch.Tensor:
    """One bool per item, computed on the device: all of its values are finite. A sum is
    finite only if every term is (NaN and inf propagate), and it reads the pixels once
    without a mask as large as the batch."""
    return images.flatten(1).sum(dim=1, dtype=torch.float32).isfinite()


def copy_out(pixels: torch.Tensor) -> np.ndarray:
    """One copy to the host: into pinned memory without blocking the stream, then wait for
    that copy alone (a CPU tensor is returned as it is)."""
    if pixels.device.type != "cuda":
        return pixels.numpy()
    host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    done = torch.cuda.Event()  # type: ignore[no-untyped-call]
    done.record()
    done.synchronize()
    return host.numpy()
