"""The engine near the hardware, on the tiny weights: dtype you can trust, pixels made on
the device (uint8, as diffusers' PIL path makes them), a NaN guard behind them, the tiny
VAE as its own batch shape, device kernels, and the memory budget per shape."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipelines.base import ImageItem, NotFinite
from pipelines.registry import SDXL, TAESDXL, best_weights
from pipelines.sdxl_turbo import Limits, SDXLTurbo, check_dtypes

LIMITS = Limits(min_side=64)


def load(tiny_weights: Path, **kw: Any) -> SDXLTurbo:
    sdxl, tiny = best_weights(tiny_weights, SDXL), best_weights(tiny_weights, TAESDXL)
    assert sdxl is not None and tiny is not None
    return SDXLTurbo.load(sdxl.path, torch.device("cpu"), limits=LIMITS,
                          tiny_vae=tiny.path, **kw)


@pytest.fixture(scope="module")
def engine(tiny_weights: Path) -> SDXLTurbo:
    return load(tiny_weights)


@pytest.fixture(scope="module")
def bf16(tiny_weights: Path) -> SDXLTurbo:
    return load(tiny_weights, dtype="bf16")


def items(n: int, vae: str = "full", size: int = 64, seed: int = 10) -> list[ImageItem]:
    return [ImageItem(f"a lighthouse {i}", seed + i, size, size, 1, vae=vae)  # type: ignore[arg-type]
            for i in range(n)]


def pictures(out: list[Any]) -> list[np.ndarray]:
    assert all(isinstance(p, np.ndarray) for p in out), out
    return [p.astype(int) for p in out]


# -- dtype -----------------------------------------------------------------------------
def test_bf16_is_what_loads_everywhere_and_the_vae_is_never_upcast(bf16: SDXLTurbo) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(bf16.pipe, name).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.vaes["tiny"].parameters()} == {torch.bfloat16}
    assert not bf16.upcast and bf16.pipe.vae.config.force_upcast is False
    out = pictures(bf16.generate(items(2)))
    assert out[0].shape == (64, 64, 3) and np.abs(out[0] - out[1]).mean() > 5


def test_a_component_in_another_dtype_is_an_error_naming_it(engine: SDXLTurbo) -> None:
    """What diffusers before 0.40 does: `dtype=` ignored, everything fp32."""
    with pytest.raises(RuntimeError, match="unet loaded as float32, not bfloat16"):
        check_dtypes({"unet": engine.pipe.unet}, torch.bfloat16)


def test_fp16_decodes_in_fp32_unless_the_fp16_fix_vae_is_there(tiny_weights: Path) -> None:
    plain = load(tiny_weights, dtype="fp16")
    assert plain.upcast and plain.pipe.vae.dtype == torch.float16
    pictures(plain.generate(items(1)))
    assert plain.pipe.vae.dtype == torch.float16  # cast back after the fp32 decode
    sdxl = best_weights(tiny_weights, SDXL)
    assert sdxl is not None
    fixed = load(tiny_weights, dtype="fp16", fp16_vae=sdxl.path / "vae")
    assert not fixed.upcast
    pictures(fixed.generate(items(1)))


def test_an_unknown_dtype_is_refused(tiny_weights: Path) -> None:
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        load(tiny_weights, dtype="fp8")


# -- pixels on the device ----------------------------------------------------------------
def test_uint8_pixels_match_diffusers_pil_path(engine: SDXLTurbo) -> None:
    batch = items(3, seed=5)
    ours = pictures(engine.generate(batch))
    gens = [torch.Generator().manual_seed(i.seed) for i in batch]
    theirs = engine.pipe(prompt=[i.prompt for i in batch], width=64, height=64,
                         num_inference_steps=1, guidance_scale=0.0, generator=gens,
                         output_type="pil").images
    for a, b in zip(ours, theirs, strict=True):
        assert np.abs(a - np.asarray(b).astype(int)).max() <= 1


# -- finite or fail ------------------------------------------------------------------------
def poison(vae: Any, row: int, *, only_below_fp32: bool) -> Callable[[], None]:
    """The VAE's decoder returning NaN for one row in half precision, and (unless
    ``only_below_fp32``) for every row it decodes in fp32. A forward hook: it goes wherever
    the decoder goes, a copy made for an fp32 decode included."""

    def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        if out.dtype != torch.float32:
            out[row] = float("nan")
        elif not only_below_fp32:
            out[:] = float("nan")
        return out

    return vae.decoder.register_forward_hook(hook).remove  # type: ignore[no-any-return]


def test_a_nan_in_half_precision_is_decoded_again_in_fp32(bf16: SDXLTurbo) -> None:
    clean = pictures(bf16.generate(items(3)))
    restore = poison(bf16.pipe.vae, 1, only_below_fp32=True)
    try:
        out = pictures(bf16.generate(items(3)))
    finally:
        restore()
    assert np.array_equal(out[0], clean[0]) and np.array_equal(out[2], clean[2])
    assert np.abs(out[1] - clean[1]).mean() < 3  # the same picture, decoded in fp32
    assert {p.dtype for p in bf16.pipe.vae.parameters()} == {torch.bfloat16}


def test_an_item_that_stays_nan_fails_alone(bf16: SDXLTurbo) -> None:
    restore = poison(bf16.pipe.vae, 1, only_below_fp32=False)
    try:
        out = bf16.generate(items(3))
        with pytest.raises(NotFinite):
            bf16.run(items(3))
    finally:
        restore()
    assert isinstance(out[1], NotFinite) and "NaN" in str(out[1])
    assert all(isinstance(out[i], np.ndarray) for i in (0, 2))


# -- the tiny VAE ----------------------------------------------------------------------------
def test_the_tiny_vae_decodes_the_same_latents_differently(engine: SDXLTurbo) -> None:
    full = pictures(engine.generate(items(2)))
    tiny = pictures(engine.generate(items(2, vae="tiny")))
    assert tiny[0].shape == full[0].shape == (64, 64, 3)
    assert np.abs(tiny[0] - full[0]).mean() > 5
    assert np.array_equal(tiny[0], pictures(engine.generate(items(1, vae="tiny")))[0])


def test_tiny_and_full_vae_items_never_share_a_call(engine: SDXLTurbo) -> None:
    assert items(1)[0].shape_key != items(1, vae="tiny")[0].shape_key
    with pytest.raises(ValueError, match="mixes"):
        engine.generate(items(1) + items(1, vae="tiny"))


def test_a_vae_that_is_not_loaded_is_refused(tiny_weights: Path) -> None:
    sdxl = best_weights(tiny_weights, SDXL)
    assert sdxl is not None
    bare = SDXLTurbo.load(sdxl.path, torch.device("cpu"), limits=LIMITS)
    assert bare.vae_choices == ("full",)
    with pytest.raises(ValueError, match="vae 'tiny' is not loaded"):
        bare.generate(items(1, vae="tiny"))


# -- kernels --------------------------------------------------------------------------------
def test_device_kernels_keep_the_pictures(tiny_weights: Path, engine: SDXLTurbo) -> None:
    """channels-last and fused QKV projections (what a CUDA device gets) change rounding,
    not pictures."""
    tuned = load(tiny_weights, tune=True)
    assert "fused qkv" in tuned.attention
    assert tuned.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(pictures(tuned.generate(items(2))), pictures(engine.generate(items(2))),
                    strict=True):
        assert np.abs(a - b).max() <= 2


# -- memory -----------------------------------------------------------------------------------
def test_an_oom_fails_its_batch_and_halves_that_shapes_budget(tiny_weights: Path) -> None:
    e = load(tiny_weights)
    alone = [pictures(e.generate([item]))[0] for item in items(4)]
    seen: list[int] = []

    def small_device(module: Any, args: tuple[Any, ...]) -> None:
        seen.append(int(args[0].shape[0]))
        if args[0].shape[0] > 2 and args[0].shape[-1] == 64 // 8:  # 64x64 pictures only
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = e.pipe.unet.register_forward_pre_hook(small_device)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            e.generate(items(4))
        key = items(1)[0].shape_key
        assert e.max_items[key] == 2
        seen.clear()
        again = pictures(e.generate(items(4)))  # now two calls of 2
        assert seen == [2, 2]
        other = pictures(e.generate(items(3, size=128)))  # another shape: not limited
    finally:
        hook.remove()
    assert seen[-1] == 3 and len(other) == 3
    for a, b in zip(again, alone, strict=True):
        assert np.abs(a - b).max() <= 1
