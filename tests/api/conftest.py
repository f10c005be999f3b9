"""Fixtures for the API tests that drive the tiny engine through a gate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipelines.registry import WeightsInfo, best_weights
from pipelines.sdxl_turbo import SDXLTurbo
from tests.api.gated import Device


@pytest.fixture(scope="module")
def weights(tiny_weights: Path) -> WeightsInfo:
    info = best_weights(tiny_weights)
    assert info is not None
    return info


@pytest.fixture(scope="module")
def engine(weights: WeightsInfo) -> SDXLTurbo:
    return SDXLTurbo.load(weights.path, torch.device("cpu"))


@pytest.fixture
def device(engine: SDXLTurbo) -> Iterator[Device]:
    d = Device(engine)
    yield d
    d.gate.set()
