"""Compiled shape buckets on the tiny model: compiled at load, before the engine says it is
ready; the same pictures as eager; and no compilation ever on the request path, whatever
mix of batch sizes, sizes and decoders arrives."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.base import ImageItem
from pipelines.buckets import parse_buckets
from pipelines.registry import SDXL, TAESDXL, best_weights
from pipelines.sdxl_turbo import Limits, SDXLTurbo

LIMITS = Limits(min_side=64)
BUCKETS = ["64x64@1", "64x64@2"]


class Counting:
    """A torch.compile backend that counts the graphs it is asked to compile and the
    times a compiled graph runs (the eager graph module runs as compiled)."""

    def __init__(self) -> None:
        self.compiled = 0
        self.runs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.compiled += 1

        def run(*args: Any) -> Any:
            self.runs += 1
            return gm.forward(*args)

        return run


def load(tiny_weights: Path) -> SDXLTurbo:
    sdxl, tiny = best_weights(tiny_weights, SDXL), best_weights(tiny_weights, TAESDXL)
    assert sdxl is not None and tiny is not None
    return SDXLTurbo.load(sdxl.path, torch.device("cpu"), limits=LIMITS, tiny_vae=tiny.path)


def traffic() -> list[list[ImageItem]]:
    """Mixed sizes, batch sizes and decoders; a 3 becomes 2 + 1, a 128x64 runs eagerly."""
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    out: list[list[ImageItem]] = []
    for vae in ("full", "tiny"):
        for n in (1, 2, 3):
            out.append([ImageItem(f"p{i}", 40 + i, 64, 64, 1, vae=vae)  # type: ignore[arg-type]
                        for i in range(n)])
    out.append([ImageItem("wide", 7, 128, 64, 1) for _ in range(2)])
    out.append([ImageItem("edit", 8, 64, 64, 2, init_image=source, strength=0.5)])
    return out


@pytest.fixture(scope="module")
def eager(tiny_weights: Path) -> SDXLTurbo:
    return load(tiny_weights)


def test_warmed_buckets_never_compile_again(tiny_weights: Path, eager: SDXLTurbo) -> None:
    engine = load(tiny_weights)
    backend = Counting()
    took = engine.compile(parse_buckets(BUCKETS), backend=backend)  # type: ignore[arg-type]
    assert [(str(b), vae) for b, vae, _ in took] == [
        ("64x64@1", "full"), ("64x64@1", "tiny"), ("64x64@2", "full"), ("64x64@2", "tiny")]
    warm_graphs = backend.compiled
    assert warm_graphs >= 2 * 3  # per bucket: the UNet and each decoder
    backend.runs = 0
    for batch in traffic():
        ours, theirs = engine.generate(batch), eager.generate(batch)
        for a, b in zip(ours, theirs, strict=True):
            assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert backend.compiled == warm_graphs, "a graph was compiled on the request path"
    assert backend.runs > 0, "the compiled graphs were never used"


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler on the CPU (Debian: apt install g++)")
def test_inductor_makes_the_same_pictures(tiny_weights: Path, eager: SDXLTurbo) -> None:
    """The real compiler (C++ codegen on the CPU): ~50 s on 2 cores for one bucket with both
    decoders, the price of checking its pixels against eager here."""
    from torch._dynamo.utils import counters

    engine = load(tiny_weights)
    engine.compile(parse_buckets(["64x64@1"]))
    graphs = counters["stats"]["unique_graphs"]
    batch = [ImageItem("a lighthouse", 3, 64, 64, 1)]
    a, b = engine.generate(batch)[0], eager.generate(batch)[0]
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    engine.generate([ImageItem("again", 4, 64, 64, 1)])
    assert counters["stats"]["unique_graphs"] == graphs
