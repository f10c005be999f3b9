"""A batcher with several devices (runners): the work goes to those that can take it,
the estimates count only those, and a batch whose device died under it runs again, once,
on the next free one."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest

from server.providers.local.batcher import Batcher, BatchPolicy

WAIT = 10.0


class Died(RuntimeError):
    retry_elsewhere = True
    retry_rows: frozenset[int] | None = None


class Device:
    """A runner: answers each item with its own name, or dies ``dies`` times first."""

    def __init__(self, name: str, *, dies: int = 0, ready: bool = True,
                 wakes: Device | None = None, rows: frozenset[int] | None = None) -> None:
        self.name = name
        self.dies = dies
        self.rows = rows  # which rows its death lets run again (None: all)
        self.ready = ready
        self.wakes = wakes  # made ready when this one dies
        self.ran: list[list[int]] = []
        self.recovered = 0

    def run(self, items: list[int]) -> list[str]:
        if self.dies:
            self.dies -= 1
            if self.wakes is not None:
                self.wakes.ready = True
            died = Died(f"{self.name} died")
            died.retry_rows = self.rows
            raise died
        self.ran.append(items)
        return [f"{self.name}:{i}" for i in items]

    def recover(self) -> None:
        self.recovered += 1


class Item(int):
    @property
    def shape_key(self) -> str:
        return "one"

    @property
    def pixels(self) -> int:
        return 64 * 64


POLICY = BatchPolicy(max_batch=4, max_wait_s=0.0, max_queue=64)


def batcher(*devices: Device) -> Batcher[Item, str]:
    b: Batcher[Item, str] = Batcher("test", None, POLICY, runners=list(devices))
    b.start()
    return b


def results(futures: list[Future[str]]) -> list[str]:
    return [f.result(WAIT) for f in futures]


def test_a_batch_whose_device_died_runs_again_on_another() -> None:
    # The healthy one takes work only once the other has died: the batch goes to the
    # dying one first, whichever thread wakes first.
    healthy = Device("b", ready=False)
    dying = Device("a", dies=1, wakes=healthy)
    b = batcher(dying, healthy)
    try:
        got = results(b.submit([Item(i) for i in range(3)], 60))
    finally:
        b.close(WAIT)
    ran_on = {r.split(":")[0] for r in got}
    assert len(got) == 3 and ran_on <= {"a", "b"}
    assert sorted(int(r.split(":")[1]) for r in got) == [0, 1, 2]
    assert dying.recovered == 1  # the dead one was brought back


def test_only_the_rows_a_death_lets_run_again_do() -> None:
    """A VLM worker killed mid-batch: the row that had streamed text fails (a re-run
    would send its text twice), the batch's other rows get their answers."""
    healthy = Device("b", ready=False)
    dying = Device("a", dies=1, wakes=healthy, rows=frozenset({0, 2}))
    b = batcher(dying, healthy)
    try:
        futures = b.submit([Item(i) for i in range(3)], 60)
        assert sorted(int(futures[i].result(WAIT).split(":")[1]) for i in (0, 2)) == [0, 2]
        with pytest.raises(Died):
            futures[1].result(WAIT)
    finally:
        b.close(WAIT)


def test_a_batch_that_kills_every_device_fails_after_one_retry() -> None:
    """A poison batch takes down two devices at most, never the whole pool."""
    a, b_, c = Device("a", dies=5), Device("b", dies=5), Device("c", dies=5)
    b = batcher(a, b_, c)
    try:
        futures = b.submit([Item(1), Item(2)], 60)
        for f in futures:
            with pytest.raises(Died):
                f.result(WAIT)
    finally:
        b.close(WAIT)
    assert a.dies + b_.dies + c.dies == 15 - 2  # two deaths: the try and the one retry


def test_a_device_that_is_not_ready_takes_no_work_and_is_not_counted() -> None:
    down, up = Device("down", ready=False), Device("up")
    b = batcher(down, up)
    try:
        assert b.live_devices() == 1
        assert {r.split(":")[0] for r in results(b.submit([Item(i) for i in range(8)], 60))} \
            == {"up"}
        assert down.ran == []
        up.ready = False  # now nothing can take work: the wait is unbounded, so the router
        assert b.estimated_wait([Item(1)]) == float("inf")  # spills or refuses instead
        up.ready = True
    finally:
        b.close(WAIT)


def test_two_devices_run_two_batches_at_once() -> None:
    gate = threading.Barrier(2, timeout=WAIT)

    class Meeting(Device):
        def run(self, items: list[int]) -> list[str]:
            gate.wait()  # returns only when both devices are in a batch at the same time
            return super().run(items)

    a, b_ = Meeting("a"), Meeting("b")
    b = batcher(a, b_)
    try:
        first = b.submit([Item(i) for i in range(4)], 60)  # one full batch (max_batch 4)
        time.sleep(0.05)
        second = b.submit([Item(i) for i in range(4, 8)], 60)
        assert len(results(first) + results(second)) == 8
    finally:
        b.close(WAIT)
    assert len(a.ran) == 1 and len(b_.ran) == 1
