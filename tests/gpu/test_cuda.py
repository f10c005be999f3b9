"""Runs only where CUDA exists (skipped elsewhere): fp16 batching on the device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.base import ImageItem, pick_dtype
from pipelines.registry import best_weights
from pipelines.sdxl_turbo import SDXLTurbo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fp16_batch_on_cuda(tiny_weights: Path) -> None:
    info = best_weights(tiny_weights)
    assert info is not None
    device = torch.device("cuda")
    engine = SDXLTurbo.load(info.path, device)
    assert pick_dtype(device) == torch.float16 and engine.pipe.unet.dtype == torch.float16
    items = [ImageItem(f"p{i}", i, 512, 512, 1) for i in range(8)]
    images = engine.text2img(items)
    assert [im.size for im in images] == [(512, 512)] * 8
    first = np.asarray(images[0]).astype(int)
    assert np.abs(first - np.asarray(images[1]).astype(int)).mean() > 1
    again = np.asarray(engine.text2img(items)[0]).astype(int)
    assert np.array_equal(first, again)
    alone = np.asarray(engine.text2img(items[:1])[0]).astype(int)
    assert np.abs(first - alone).max() <= 2  # fp16 kernels differ by batch size too


def test_xformers_when_installed(tiny_weights: Path) -> None:
    pytest.importorskip("xformers")
    info = best_weights(tiny_weights)
    assert info is not None
    engine = SDXLTurbo.load(info.path, torch.device("cuda"), xformers=True)
    assert engine.attention == "xformers"
    assert engine.text2img([ImageItem("x", 1, 512, 512, 1)])[0].size == (512, 512)
