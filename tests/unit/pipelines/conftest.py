"""The tiny Qwen3-VL, loaded once per test module (from the session's tiny weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.registry import VLM, best_weights
from pipelines.vlm import VisionLanguageModel


@pytest.fixture(scope="module")
def folder(tiny_weights: Path) -> Path:
    info = best_weights(tiny_weights, VLM)
    assert info is not None
    return info.path


@pytest.fixture(scope="module")
def vlm(folder: Path) -> VisionLanguageModel:
    return VisionLanguageModel.load(folder, torch.device("cpu"))
