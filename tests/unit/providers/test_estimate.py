"""The batcher's estimates and batch forming by measured cost: the pure arithmetic
(estimate.py, forming.py) and, with a fake device that sleeps like a real one (a fixed
overhead per call plus a cost per item), what a client sees: estimates that hold at
their p95, and a steady 16-client load that settles into full batches."""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass

import pytest

from server.providers.local.batcher import Batcher, BatchPolicy, Pending, form_batch
from server.providers.local.estimate import Arrivals, Calibration, Waiting, eta, fit_line
from server.providers.local.forming import company_hold


@dataclass(frozen=True)
class Item:
    name: str
    side: int = 64

    @property
    def shape_key(self) -> int:
        return self.side

    @property
    def pixels(self) -> int:
        return self.side * self.side


# -- pure arithmetic ------------------------------------------------------------------

def test_fit_line_recovers_overhead_and_per_item_cost() -> None:
    a, b = 0.015, 0.002
    fit = fit_line([(n, a + b * n) for n in (2, 14, 2, 14, 16)])
    assert fit == pytest.approx((a, b))


def test_fit_line_with_one_size_is_all_per_item_and_never_negative() -> None:
    assert fit_line([(4, 0.4), (4, 0.4)]) == pytest.approx((0.0, 0.1))
    assert fit_line([]) is None
    # Noise that would fit a negative overhead is fitted through the origin instead.
    a, b = fit_line([(1, 0.001), (10, 0.2)])  # type: ignore[misc]
    assert a == 0.0 and b > 0


def cost(_key: object, _pixels: int, n: int) -> float:
    return 0.010 + 0.001 * n


def test_eta_counts_whole_batches_and_the_new_items_last_one() -> None:
    shape = Waiting(64, 64 * 64)
    common = dict(batch_s=cost, capacity=lambda px: 4)
    # 6 queued + 1 new at 4 a batch: one full batch ahead, then the new item's batch of 3.
    assert eta([shape] * 6, [shape], free_in_s=[0.0], **common) == pytest.approx(
        (0.010 + 0.004) + (0.010 + 0.003))
    # Two devices: the batch ahead runs on one while the new item's runs on the other.
    assert eta([shape] * 6, [shape], free_in_s=[0.0, 0.0], **common) == pytest.approx(
        0.010 + 0.003)
    # ... unless the other is busy for longer than the batch ahead takes.
    assert eta([shape] * 6, [shape], free_in_s=[0.0, 0.5], **common) == pytest.approx(
        (0.010 + 0.004) + (0.010 + 0.003))
    # Nothing ahead and not full: it waits for company first.
    assert eta([], [shape], free_in_s=[0.0], forming_wait_s=0.01, **common) == (
        pytest.approx(0.011 + 0.01))
    # No live device: never.
    assert eta([], [shape], free_in_s=[], **common) == float("inf")
    # Draining: all of it.
    assert eta([shape] * 5, [], free_in_s=[0.0], **common) == pytest.approx(0.014 + 0.011)


def test_a_new_item_that_would_make_an_earlier_one_late_rides_in_a_later_batch() -> None:
    """The device is busy for 0.1 s; an item due in 0.1115 s fits in a batch of 1 there
    (0.111 s), not of 2 (0.112). So the next item's batch is its own, after it, and its
    estimate says so, instead of the 0.112 s that would break the first one's."""
    common = dict(batch_s=cost, capacity=lambda px: 16, free_in_s=[0.1])
    tight = Waiting(64, 64 * 64, due_s=0.1115)
    new = Waiting(64, 64 * 64)
    assert eta([tight], [new], **common) == pytest.approx(0.111 + 0.011)
    # With room in its due, they share a batch.
    roomy = Waiting(64, 64 * 64, due_s=1.0)
    assert eta([roomy], [new], **common) == pytest.approx(0.112)
    # The stretch counts against the due too: 0.111 x 1.1 = 0.1221 fits a due at 0.1225,
    # 0.112 x 1.1 does not.
    stretched = Waiting(64, 64 * 64, due_s=0.1225)
    assert eta([stretched], [new], **common) == pytest.approx(0.112)
    assert eta([stretched], [new], stretch=1.1, **common) == pytest.approx(0.111 + 0.011)
    # One that is late whatever happens constrains nothing.
    hopeless = Waiting(64, 64 * 64, due_s=0.05)
    assert eta([hopeless], [new], **common) == pytest.approx(0.112)


def test_a_batch_stops_growing_before_it_would_make_an_item_late() -> None:
    policy = BatchPolicy(max_batch=16, max_wait_s=0.0)

    def batch_s(_key: object, _pixels: int, n: int) -> float:
        return 0.010 + 0.001 * n

    # Due at 1.0135: done by 1.013 in a batch of 3, 1.014 in a batch of 4.
    pending = [Pending(Item("first"), enqueued=0.0, deadline=1e9, due=1.0135)] + [
        Pending(Item(f"p{i}"), enqueued=0.0, deadline=1e9) for i in range(5)]
    assert form_batch(pending, 1.0, policy, batch_s=batch_s).take == (0, 1, 2)
    # Stretched by the calibrated error: 0.012 x 1.1 fits, 0.013 x 1.1 does not.
    assert form_batch(pending, 1.0, policy, batch_s=batch_s, stretch=1.1).take == (0, 1)
    # An item that is late even alone does not hold the batch back.
    late = [Pending(Item("late"), enqueued=0.0, deadline=1e9, due=1.005)] + pending[1:]
    assert len(form_batch(late, 1.0, policy, batch_s=batch_s).take) == 6
    # Nor does a wait for company that would make it late happen.
    two = pending[:2]
    held = form_batch(two, 1.0, policy, idle_s=0.0, hold_s=lambda _k: 0.002,
                      batch_s=batch_s)
    assert held.take == (0, 1)
    assert form_batch(pending[1:3], 1.0, policy, idle_s=0.0, hold_s=lambda _k: 0.002,
                      batch_s=batch_s).wait_s == pytest.approx(0.002)


def test_calibration_is_a_high_quantile_of_recent_observations() -> None:
    cal = Calibration(window=200, quantile=0.99, empty=1.0, max_age_s=60.0)
    assert cal.value(0.0) == 1.0  # nothing learnt
    cal.add(1.3, 0.0)
    cal.add(0.9, 0.0)
    assert cal.value(0.0) == 1.3  # a few: the worst of them
    for i in range(198):
        cal.add(1.0 + i / 1000, 1.0)
    ordered = sorted([1.3, 0.9] + [1.0 + i / 1000 for i in range(198)])
    assert cal.value(1.0) == ordered[198]  # of 200: the second worst (2 / 201 <= 1%)
    # A minute on, the first two have aged out: of 198, the worst (2 / 199 > 1%).
    assert cal.value(60.5) == max(1.0 + i / 1000 for i in range(198))
    # And once all have, it is empty again: a bad stretch does not rule for ever.
    assert cal.value(62.0) == 1.0


@pytest.mark.parametrize("n", [99, 120, 256])
def test_calibration_bound_is_exceeded_no_more_often_than_its_quantile_allows(n: int) -> None:
    """What admission relies on: the next observation exceeds the bound learnt from the
    last n at most 1% of the time, whatever their distribution (the sample p99 of 120,
    the second largest, is exceeded 1.65% of the time)."""
    rng = random.Random(n)
    trials, exceeded = 6000, 0
    for _ in range(trials):
        cal = Calibration(window=n, quantile=0.99, max_age_s=1e9)
        for _ in range(n):
            cal.add(rng.lognormvariate(0.0, 0.3), 0.0)
        exceeded += rng.lognormvariate(0.0, 0.3) > cal.value(0.0)
    assert exceeded / trials <= 0.012  # 1%, and the sampling noise of 6,000 trials


def test_arrivals_counts_the_last_window() -> None:
    arrivals = Arrivals(window_s=1.0)
    arrivals.add(0.0, 10)
    arrivals.add(0.5, 5)
    assert arrivals.per_s(0.9) == 15
    assert arrivals.per_s(1.2) == 5


def test_company_hold_waits_only_when_the_overhead_buys_a_larger_batch() -> None:
    policy = BatchPolicy(max_hold_s=0.05)
    assert company_hold(0.015, 300.0, policy) == pytest.approx(0.015)  # busy: wait for it
    assert company_hold(0.015, 10.0, policy) == 0.0  # light load: a lone request runs now
    assert company_hold(0.0, 1e6, policy) == 0.0  # no overhead: nothing to gain
    assert company_hold(0.2, 300.0, policy) == 0.05  # capped


def test_a_freed_device_holds_a_small_batch_for_company_then_takes_it() -> None:
    policy = BatchPolicy(max_batch=16, max_wait_s=0.01)
    pending = [Pending(Item(f"p{i}"), enqueued=0.0, deadline=1e9) for i in range(2)]
    # Both waited long; the device freed 2 ms ago and the hold is 15 ms: not yet.
    held = form_batch(pending, 1.0, policy, idle_s=0.002, hold_s=lambda _k: 0.015)
    assert held.take == () and held.wait_s == pytest.approx(0.013)
    # Once the hold is over it takes what there is.
    assert form_batch(pending, 1.0, policy, idle_s=0.015,
                      hold_s=lambda _k: 0.015).take == (0, 1)
    # A full batch never waits.
    full = [Pending(Item(f"p{i}"), enqueued=1.0, deadline=1e9) for i in range(16)]
    assert len(form_batch(full, 1.0, policy, idle_s=0.0,
                          hold_s=lambda _k: 0.015).take) == 16


# -- the batcher with a device that costs overhead + n x per item -----------------------

OVERHEAD_S = 0.015
PER_ITEM_S = 0.002


class SleepyDevice:
    def __init__(self, noise: float = 0.0, seed: int = 1) -> None:
        self.sizes: list[int] = []
        self.noise = noise
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def __call__(self, items: list[Item]) -> list[str]:
        with self.lock:
            self.sizes.append(len(items))
            jitter = 1 + self.noise * (2 * self.rng.random() - 1)
        time.sleep((OVERHEAD_S + PER_ITEM_S * len(items)) * jitter)
        return [i.name for i in items]


def test_a_steady_16_client_load_settles_into_full_batches() -> None:
    """16 clients, each sending its next request a little after its answer, some later
    than others (as an HTTP side delivering answers one by one does): the stragglers
    miss the forming window, and without waiting for company the batches lock into a
    large one and a small one taking turns. Batch forming by measured cost closes that
    split."""
    device = SleepyDevice()
    b: Batcher[Item, str] = Batcher("t", device, BatchPolicy(max_batch=16, max_wait_s=0.01),
                                    default_item_s=0.01)
    b.start()
    stop = time.monotonic() + 4.0

    def client(i: int) -> None:
        while time.monotonic() < stop:
            (f,) = b.submit([Item(f"c{i}")], timeout_s=30)
            f.result(timeout=30)
            time.sleep(0.001 * i)  # client i is back i ms after its answer

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    settled = device.sizes[len(device.sizes) // 2:]
    assert statistics.mean(settled) >= 14, device.sizes


def test_admitting_on_the_stretched_estimate_keeps_items_on_time() -> None:
    """A device whose batches vary by +-40% around their mean: the bare estimate is
    beaten about half the time, the calibrated one (what estimated_wait returns and the
    router compares with a deadline) about one time in a hundred."""
    device = SleepyDevice(noise=0.4)
    b: Batcher[Item, str] = Batcher("t", device, BatchPolicy(max_batch=4, max_wait_s=0.0),
                                    default_item_s=0.01)
    b.start()
    outcomes: list[tuple[float, float, float]] = []  # (raw, calibrated, took)
    lock = threading.Lock()
    stop = time.monotonic() + 5.0

    def client() -> None:
        while time.monotonic() < stop:
            items = [Item("x")]
            calibrated = b.estimated_wait(items)
            raw = calibrated / b.snapshot().stretch
            t0 = time.monotonic()
            (f,) = b.submit(items, timeout_s=30)
            f.result(timeout=30)
            with lock:
                outcomes.append((raw, calibrated, time.monotonic() - t0))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    learnt = outcomes[len(outcomes) // 3:]  # once the errors are learnt
    assert len(learnt) > 60
    late_raw = sum(took > raw for raw, _, took in learnt) / len(learnt)
    late_calibrated = sum(took > cal for _, cal, took in learnt) / len(learnt)
    assert late_raw > 0.25, late_raw
    assert late_calibrated < 0.05, (late_calibrated, late_raw)
