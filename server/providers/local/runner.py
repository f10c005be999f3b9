"""What a batcher hands its batches to: one device each (server/providers/local/batcher.py
runs one thread per runner)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Runner(Protocol[T, R]):
    """One device: runs a batch of one shape, one result per item. ``ready`` is False
    while it cannot take work (a worker process starting or restarting); ``recover``
    is called on its thread after a failed batch and may block until it is back."""

    name: str

    @property
    def ready(self) -> bool: ...

    def run(self, items: list[T]) -> list[R]: ...

    def recover(self) -> None: ...


class InThread(Generic[T, R]):
    """A pipeline called in this process, on the batcher's thread."""

    def __init__(self, run: Callable[[list[T]], list[R]], name: str = "in-process") -> None:
        self.name = name
        self._run = run
        self.ready = True

    def run(self, items: list[T]) -> list[R]:
        return self._run(items)

    def recover(self) -> None:
        pass
