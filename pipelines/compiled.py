"""Compiled shape buckets: ``torch.compile`` graphs made for the shapes the operator names,
at start-up, and never on the request path.

Each bucket is a width, a height and a batch size. A batch whose size has no bucket is run
as chunks of bucket sizes, the last one padded with copies of its last item (their outputs
are dropped): a padded chunk costs a few images' work, a recompilation on the request path
costs seconds to minutes. Sizes with no bucket at all run eagerly. Latent noise is drawn
by the pipeline, eagerly, from each item's own generator: only the UNet and the VAE
decoder are compiled, so a seed means the same picture compiled or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class _Decode(torch.nn.Module):
    """``vae.decode`` as a module, so the decoder compiles as one unit."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.vae.decode(latents, return_dict=False)[0]
        return out


class _Entry(torch.nn.Module):
    """What the pipeline calls in place of its UNet: the latents made contiguous, then the
    compiled graph. Graphs are guarded on strides, and image-to-image hands the UNet
    latents in another layout (from the VAE encoder) than text-to-image: without this it
    would compile again on the request path. Everything else (``config``, ``dtype``...)
    is the UNet's own."""

    def __init__(self, compiled: Any) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(sample.contiguous(), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("compiled", "_modules"):  # not built yet (a copy being made)
                raise
            return getattr(self.compiled, name)


class Compiled:
    """The compiled UNet and decoders, and which shapes are warm. Only ``warm`` buckets are
    ever handed to a compiled graph (``dynamic=False``: one static graph per bucket)."""

    def __init__(self, unet: Any, vaes: dict[str, Any], *, mode: str | None = None,
                 backend: str | Callable[..., Any] = "inductor") -> None:
        self.unet = _Entry(torch.compile(unet, mode=mode, backend=backend, dynamic=False))
        self.decoders = {name: torch.compile(_Decode(vae), mode=mode, backend=backend,
                                             dynamic=False)
                         for name, vae in vaes.items()}
        self.warm: set[tuple[int, int, int, str]] = set()  # width, height, batch, vae

    def sizes(self, width: int, height: int, vae: str) -> list[int]:
        return sorted(b for w, h, b, v in self.warm if (w, h, v) == (width, height, vae))

    def has(self, width: int, height: int, batch: int, vae: str) -> bool:
        return (width, height, batch, vae) in self.warm

    def allow(self, buckets: int) -> None:
        """dynamo keeps 8 graphs per function by default; every bucket needs one."""
        limit = torch._dynamo.config.cache_size_limit
        torch._dynamo.config.cache_size_limit = max(limit, buckets + 8)
