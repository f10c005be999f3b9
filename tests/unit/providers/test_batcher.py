"""Unit tests for server.providers.local.batcher: the pure batching decisions and the worker thread.

No torch, no HTTP, no models: items are small frozen dataclasses, and the fake
``run_batch`` is blocked and released with Events so that what is queued while the
"device" is busy is fully deterministic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import pytest

from server.providers.local.batcher import (
    Batcher,
    BatchPolicy,
    Closed,
    Decision,
    Expired,
    Pending,
    QueueFull,
    form_batch,
    split_expired,
)

WAIT = 10.0  # generous timeout for anything that crosses threads


@dataclass(frozen=True)
class Item:
    prompt: str
    w: int = 64
    h: int = 64
    steps: int = 1

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return (self.w, self.h, self.steps)

    @property
    def pixels(self) -> int:
        return self.w * self.h


def pend(item: Item, enqueued: float = 0.0, deadline: float = 1e9) -> Pending[Item]:
    return Pending(item, enqueued, deadline)


# -- form_batch ---------------------------------------------------------------------------

POLICY = BatchPolicy(max_batch=8, max_batch_pixels=4 * 512 * 512, max_wait_s=0.010, max_queue=64)


def test_form_batch_empty_pending_takes_nothing():
    d = form_batch([], now=100.0, policy=POLICY)
    assert d == Decision()
    assert d.take == ()
    assert d.wait_s is None


def test_form_batch_oldest_shape_wins_and_skips_other_shapes_in_arrival_order():
    pending = [
        pend(Item("a0", 256, 256)),
        pend(Item("b0", 512, 512)),
        pend(Item("a1", 256, 256)),
        pend(Item("c0", 256, 256, steps=4)),  # same pixels, different shape: not compatible
        pend(Item("b1", 512, 512)),
        pend(Item("a2", 256, 256)),
    ]
    d = form_batch(pending, now=1.0, policy=POLICY)  # oldest waited 1s >= max_wait
    assert d.take == (0, 2, 5)
    assert [pending[i].item.prompt for i in d.take] == ["a0", "a1", "a2"]


def test_form_batch_oldest_shape_wins_even_when_another_shape_has_more_items():
    pending = [pend(Item("b0", 512, 512))] + [pend(Item(f"a{i}", 256, 256)) for i in range(5)]
    d = form_batch(pending, now=1.0, policy=POLICY)
    assert d.take == (0,)


def test_form_batch_caps_at_max_batch_and_closes_immediately():
    policy = BatchPolicy(max_batch=3, max_batch_pixels=10**9, max_wait_s=60.0)
    pending = [pend(Item(f"a{i}"), enqueued=10.0) for i in range(5)]
    d = form_batch(pending, now=10.0, policy=policy)  # nobody has waited at all
    assert d.take == (0, 1, 2)
    assert d.wait_s is None


def test_form_batch_pixel_budget_counts_pixels_not_items():
    policy = BatchPolicy(max_batch=64, max_batch_pixels=4 * 512 * 512, max_wait_s=60.0)
    big = [pend(Item(f"big{i}", 512, 512)) for i in range(10)]
    d = form_batch(big, now=0.0, policy=policy)
    assert d.take == (0, 1, 2, 3)  # budget full: closes without waiting

    small = [pend(Item(f"small{i}", 256, 256)) for i in range(20)]
    d = form_batch(small, now=0.0, policy=policy)
    assert d.take == tuple(range(16))


def test_form_batch_exactly_full_pixel_budget_closes_immediately():
    policy = BatchPolicy(max_batch=64, max_batch_pixels=4 * 512 * 512, max_wait_s=60.0)
    pending = [pend(Item(f"big{i}", 512, 512)) for i in range(4)]
    assert form_batch(pending, now=0.0, policy=policy).take == (0, 1, 2, 3)


def test_form_batch_first_item_admitted_even_if_alone_over_pixel_budget():
    policy = BatchPolicy(max_batch=8, max_batch_pixels=512 * 512, max_wait_s=60.0)
    pending = [
        pend(Item("huge0", 1024, 1024)),
        pend(Item("huge1", 1024, 1024)),
        pend(Item("small", 64, 64)),
    ]
    d = form_batch(pending, now=0.0, policy=policy)
    assert d.take == (0,)  # alone, and immediately: nothing else could ever join it


def test_form_batch_not_full_waits_for_the_rest_of_max_wait():
    policy = BatchPolicy(max_batch=8, max_batch_pixels=10**9, max_wait_s=0.010)
    pending = [pend(Item("a0"), enqueued=100.0), pend(Item("a1"), enqueued=100.002)]
    d = form_batch(pending, now=100.004, policy=policy)
    assert d.take == ()
    assert d.wait_s == pytest.approx(0.006)


def test_form_batch_closes_once_oldest_waited_max_wait():
    policy = BatchPolicy(max_batch=8, max_batch_pixels=10**9, max_wait_s=0.010)
    pending = [pend(Item("a0"), enqueued=100.0), pend(Item("a1"), enqueued=100.009)]
    d = form_batch(pending, now=100.010, policy=policy)
    assert d.take == (0, 1)
    assert d.wait_s is None
    d = form_batch(pending, now=105.0, policy=policy)
    assert d.take == (0, 1)


# -- split_expired ------------------------------------------------------------------------

def test_split_expired_separates_live_expired_and_cancelled():
    live_a = pend(Item("live_a"), deadline=10.0)
    expired_at_now = pend(Item("exp_eq"), deadline=5.0)
    expired_before = pend(Item("exp_lt"), deadline=1.0)
    cancelled = pend(Item("cancelled"), deadline=10.0)
    assert cancelled.future.cancel()
    cancelled_and_expired = pend(Item("both"), deadline=1.0)
    assert cancelled_and_expired.future.cancel()
    live_b = pend(Item("live_b"), deadline=6.0)

    pending = [live_a, expired_at_now, cancelled, expired_before, cancelled_and_expired, live_b]
    live, expired, cancel = split_expired(pending, now=5.0)
    assert live == [live_a, live_b]
    assert expired == [expired_at_now, expired_before]
    assert cancel == [cancelled, cancelled_and_expired]


def test_split_expired_empty():
    assert split_expired([], now=0.0) == ([], [], [])


# -- Batcher: helpers ---------------------------------------------------------------------

class Clock:
    """Real monotonic time plus a jump the test controls."""

    def __init__(self) -> None:
        self.offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.monotonic() + self.offset

    def advance(self, s: float) -> None:
        with self._lock:
            self.offset += s


class FakeDevice:
    """A run_batch that records every batch it got and can be held at the door.

    ``hold()`` makes the next call block (after signalling ``entered``) until ``release()``.
    """

    def __init__(self, *, poison: str | None = None, short_for: str | None = None,
                 per_item: Callable[[int], None] | None = None) -> None:
        self.batches: list[list[Item]] = []
        self.entered = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self.poison = poison
        self.short_for = short_for
        self.per_item = per_item
        self._lock = threading.Lock()

    def hold(self) -> None:
        self.entered.clear()
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, items: list[Item]) -> list[str]:
        with self._lock:
            self.batches.append(list(items))
        self.entered.set()
        assert self._gate.wait(WAIT), "test never released the fake device"
        if self.per_item is not None:
            self.per_item(len(items))
        prompts = [i.prompt for i in items]
        if self.poison is not None and self.poison in prompts:
            raise RuntimeError(f"poisoned: {self.poison}")
        results = [f"{i.prompt}-done" for i in items]
        if self.short_for is not None and self.short_for in prompts:
            return results[:-1]
        return results

    @property
    def seen(self) -> list[str]:
        with self._lock:
            return [i.prompt for b in self.batches for i in b]

    def prompts(self) -> list[list[str]]:
        with self._lock:
            return [[i.prompt for i in b] for b in self.batches]


_open: list[tuple[Batcher, FakeDevice]] = []


def make(device: FakeDevice, policy: BatchPolicy | None = None, **kw) -> Batcher[Item, str]:
    b: Batcher[Item, str] = Batcher("test", device, policy or BatchPolicy(), **kw)
    b.start()
    _open.append((b, device))
    return b


@pytest.fixture(autouse=True)
def _close_batchers():
    yield
    while _open:
        b, device = _open.pop()
        device.release()
        b.close(timeout=WAIT)


def block_worker(b: Batcher[Item, str], device: FakeDevice, prompt: str = "first",
                 shape: tuple[int, int] = (64, 64)) -> Future[str]:
    """Put one item on the device and keep it there until device.release()."""
    device.hold()
    (fut,) = b.submit([Item(prompt, *shape)], timeout_s=60)
    assert device.entered.wait(WAIT), "worker never started the first batch"
    return fut


def wait_until(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.001)


# -- Batcher: end to end ------------------------------------------------------------------

def test_items_queued_while_busy_form_one_batch_per_shape_with_one_to_one_results():
    device = FakeDevice()
    b = make(device, BatchPolicy(max_batch=32, max_batch_pixels=10**9, max_wait_s=0.005))
    first = block_worker(b, device)

    items = []
    for i in range(10):
        items.append(Item(f"a{i}", 64, 64))
        if i % 3 == 0 and i < 9:
            items.append(Item(f"b{i // 3}", 128, 128))
    assert sum(i.shape_key == (128, 128, 1) for i in items) == 3
    futures = b.submit(items, timeout_s=60)
    assert b.snapshot().queued == 13
    assert b.snapshot().running == 1

    device.release()
    assert first.result(timeout=WAIT) == "first-done"
    results = [f.result(timeout=WAIT) for f in futures]

    assert results == [f"{i.prompt}-done" for i in items]  # each future got its own item
    assert device.prompts() == [
        ["first"],
        [f"a{i}" for i in range(10)],  # all ten in one call, in arrival order
        ["b0", "b1", "b2"],
    ]
    for batch in device.batches:
        assert len({i.shape_key for i in batch}) == 1
    wait_until(lambda: b.snapshot().running == 0)
    snap = b.snapshot()
    assert (snap.queued, snap.batches, snap.items_done) == (0, 3, 14)
    assert snap.items_per_s is not None and snap.items_per_s > 0


def test_full_queue_rejects_the_whole_request_and_enqueues_nothing():
    device = FakeDevice()
    b = make(device, BatchPolicy(max_queue=5, max_wait_s=0.0), default_item_s=5.0)
    first = block_worker(b, device)
    assert b.snapshot().queued == 0

    with pytest.raises(QueueFull) as exc_info:
        b.submit([Item(f"x{i}") for i in range(6)], timeout_s=60)
    assert exc_info.value.retry_after_s > 0
    assert b.snapshot().queued == 0

    kept = b.submit([Item(f"k{i}") for i in range(3)], timeout_s=60)
    with pytest.raises(QueueFull) as exc_info:
        b.submit([Item(f"y{i}") for i in range(3)], timeout_s=60)  # 3 + 3 > 5
    assert exc_info.value.retry_after_s >= 3 * 5.0  # at least the queued work ahead
    assert b.snapshot().queued == 3
    kept += b.submit([Item(f"k{i}") for i in range(3, 5)], timeout_s=60)  # exactly 5 fits
    assert b.snapshot().queued == 5
    with pytest.raises(QueueFull):
        b.submit([Item("one-too-many")], timeout_s=60)

    device.release()
    assert first.result(timeout=WAIT) == "first-done"
    assert [f.result(timeout=WAIT) for f in kept] == [f"k{i}-done" for i in range(5)]
    assert not any(p.startswith(("x", "y", "one-too-many")) for p in device.seen)


def test_cancelled_futures_never_reach_run_batch():
    device = FakeDevice()
    b = make(device, BatchPolicy(max_wait_s=0.0))
    first = block_worker(b, device)
    items = [Item(f"c{i}") for i in range(6)] + [Item(f"d{i}", 128, 128) for i in range(2)]
    futures = b.submit(items, timeout_s=60)
    for i in (1, 3, 6, 7):  # cancel some of each shape, including a whole shape
        assert futures[i].cancel()

    device.release()
    assert first.result(timeout=WAIT) == "first-done"
    for i, f in enumerate(futures):
        if i in (1, 3, 6, 7):
            with pytest.raises(CancelledError):
                f.result(timeout=WAIT)
        else:
            assert f.result(timeout=WAIT) == f"{items[i].prompt}-done"
    wait_until(lambda: b.snapshot().running == 0)
    assert device.prompts() == [["first"], ["c0", "c2", "c4", "c5"]]
    assert b.snapshot().queued == 0


def test_expired_items_never_reach_run_batch():
    clock = Clock()
    device = FakeDevice()
    b = make(device, BatchPolicy(max_wait_s=0.0), clock=clock)
    first = block_worker(b, device)
    doomed = b.submit([Item("late0"), Item("late1", 128, 128)], timeout_s=0.5)
    fine = b.submit([Item("ok0"), Item("ok1", 128, 128)], timeout_s=600)
    clock.advance(1.0)  # past the short deadline while the device is still busy

    device.release()
    assert first.result(timeout=WAIT) == "first-done"
    for f in doomed:
        with pytest.raises(Expired):
            f.result(timeout=WAIT)
    assert [f.result(timeout=WAIT) for f in fine] == ["ok0-done", "ok1-done"]
    assert "late0" not in device.seen
    assert "late1" not in device.seen
    assert device.prompts() == [["first"], ["ok0"], ["ok1"]]


def test_failing_batch_fails_only_its_own_futures_and_worker_survives():
    device = FakeDevice(poison="poison")
    b = make(device, BatchPolicy(max_wait_s=0.0))
    first = block_worker(b, device)
    bad = b.submit([Item("bad-a"), Item("poison"), Item("bad-b")], timeout_s=60)
    good = b.submit([Item("good-a", 128, 128), Item("good-b", 128, 128)], timeout_s=60)

    device.release()
    assert first.result(timeout=WAIT) == "first-done"
    for f in bad:
        with pytest.raises(RuntimeError, match="poisoned"):
            f.result(timeout=WAIT)
    assert [f.result(timeout=WAIT) for f in good] == ["good-a-done", "good-b-done"]
    assert device.prompts() == [["first"], ["bad-a", "poison", "bad-b"], ["good-a", "good-b"]]

    # The worker is still alive and serves the same shape that failed.
    (later,) = b.submit([Item("later")], timeout_s=60)
    assert later.result(timeout=WAIT) == "later-done"
    wait_until(lambda: b.snapshot().running == 0)
    snap = b.snapshot()
    assert snap.batches == 3  # the failed batch is not counted as done work
    assert snap.items_done == 4


def test_wrong_number_of_results_fails_that_batch():
    device = FakeDevice(short_for="short")
    b = make(device, BatchPolicy(max_wait_s=0.0))
    first = block_worker(b, device)
    short = b.submit([Item("s0"), Item("short"), Item("s2")], timeout_s=60)
    other = b.submit([Item("o0", 128, 128)], timeout_s=60)

    device.release()
    assert first.result(timeout=WAIT) == "first-done"
    for f in short:
        with pytest.raises(RuntimeError, match="2 results for 3 items"):
            f.result(timeout=WAIT)
    assert other[0].result(timeout=WAIT) == "o0-done"
    (after,) = b.submit([Item("after")], timeout_s=60)
    assert after.result(timeout=WAIT) == "after-done"


# -- estimated_wait -------------------------------------------------------------------------

def test_estimated_wait_grows_with_queued_work():
    device = FakeDevice()
    b = make(device, BatchPolicy(max_wait_s=0.0), default_item_s=2.0)
    probe = [Item("probe")]
    idle = b.estimated_wait(probe)
    assert idle == pytest.approx(2.0)  # nothing measured yet: the prior

    block_worker(b, device)
    busy = b.estimated_wait(probe)
    assert busy >= idle

    b.submit([Item(f"q{i}") for i in range(3)], timeout_s=60)
    three = b.estimated_wait(probe)
    b.submit([Item(f"r{i}") for i in range(3)], timeout_s=60)
    six = b.estimated_wait(probe)
    assert three >= busy + 3 * 2.0 - 0.5
    assert six >= three + 3 * 2.0 - 0.5
    assert b.estimated_wait(probe * 4) == pytest.approx(six + 3 * 2.0, abs=0.5)


def test_estimated_wait_learns_measured_speed_and_scales_unseen_shapes_by_pixels():
    clock = Clock()
    per_item_s = 0.25
    device = FakeDevice(per_item=lambda n: clock.advance(per_item_s * n))
    b = make(device, BatchPolicy(max_wait_s=0.0), default_item_s=5.0, clock=clock)

    for n in (1, 3, 2, 4):  # a few batches of the small shape
        futures = b.submit([Item(f"m{n}-{i}", 64, 64) for i in range(n)], timeout_s=600)
        for f in futures:
            f.result(timeout=WAIT)
    wait_until(lambda: b.snapshot().running == 0)

    small = b.estimated_wait([Item("probe", 64, 64)])
    assert small == pytest.approx(per_item_s, rel=0.5)  # measured, far from the 5s prior
    assert b.snapshot().items_per_s == pytest.approx(1 / per_item_s, rel=0.5)

    # An unseen shape four times the pixels is priced from the per-pixel cost.
    big = b.estimated_wait([Item("probe", 128, 128)])
    assert big > small
    assert big == pytest.approx(4 * small, rel=0.01)

    # And a queue of measured items adds their measured cost, not the prior.
    device.hold()
    b.submit([Item("blocker", 64, 64)], timeout_s=600)
    assert device.entered.wait(WAIT)
    b.submit([Item(f"w{i}", 64, 64) for i in range(4)], timeout_s=600)
    assert b.estimated_wait([Item("probe", 64, 64)]) == pytest.approx(
        6 * per_item_s, rel=0.5)
    device.release()


# -- close ----------------------------------------------------------------------------------

def test_close_fails_pending_lets_running_finish_and_refuses_new_work():
    device = FakeDevice()
    b = make(device, BatchPolicy(max_wait_s=0.0))
    running = block_worker(b, device)
    pending = b.submit([Item("p0"), Item("p1", 128, 128), Item("p2")], timeout_s=60)

    b.close(timeout=0)  # do not wait for the held batch
    for f in pending:
        with pytest.raises(Closed):
            f.result(timeout=WAIT)
    with pytest.raises(Closed):
        b.submit([Item("too-late")], timeout_s=60)
    assert b.snapshot().queued == 0

    device.release()
    assert running.result(timeout=WAIT) == "first-done"  # the started batch finishes
    b.close(timeout=WAIT)  # idempotent; joins the worker
    assert device.prompts() == [["first"]]


def test_close_idle_batcher_then_submit_raises_closed():
    device = FakeDevice()
    b = make(device)
    b.close(timeout=WAIT)
    with pytest.raises(Closed):
        b.submit([Item("x")], timeout_s=60)
    assert device.batches == []
