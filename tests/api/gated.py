"""The tiny SDXL engine behind a gate the test controls: "the device is busy" becomes a
fact of the test, not a race. Its fixtures are in tests/api/conftest.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from pipelines.base import ImageItem, NotFinite, Picture
from pipelines.sdxl_turbo import SDXLTurbo


class Device:
    """The tiny engine behind a gate; records every pipeline call's prompts."""

    def __init__(self, engine: SDXLTurbo) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.busy = threading.Event()
        self.calls: list[list[str]] = []
        self.fail_on = "boom"

    def generate(self, items: list[ImageItem]) -> list[Picture | NotFinite]:
        self.busy.set()
        assert self.gate.wait(60)
        self.calls.append([i.prompt for i in items])
        if any(self.fail_on in i.prompt for i in items):
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.engine.generate(items)


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


