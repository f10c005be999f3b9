"""A bounded queue feeding its devices with compatible micro-batches.

The decisions are pure functions (``form_batch``, ``split_expired`` in forming.py; the
estimate's arithmetic in estimate.py); the ``Batcher`` class only holds the lock, one
thread per device (a ``Runner``: a pipeline in this process, or an engine worker process)
and the measurements. While the devices run, arriving items queue up grouped by shape,
so the next batch is ready the moment one frees, and it is as large as the waiting work
allows.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pipelines.base import NotFinite
from server.errors import APIError, shutting_down
from server.providers.local.estimate import (
    Arrivals,
    Calibration,
    CostModel,
    Waiting,
    eta,
)
from server.providers.local.forming import (
    BatchPolicy,
    Decision,
    Item,
    Pending,
    capacity,
    company_hold,
    form_batch,
    split_expired,
)
from server.providers.local.runner import InThread, Runner
from server.retry_after import NO_RETRY, retry_headers

__all__ = ["BatchDone", "BatchPolicy", "Batcher", "Closed", "Decision", "Expired", "Item",
           "Pending", "QueueFull", "Snapshot", "Timing", "form_batch", "from_batch_failure",
           "split_expired", "timing_of"]

log = logging.getLogger(__name__)


T = TypeVar("T", bound=Item)
R = TypeVar("R")


class QueueFull(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full, retry after {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class Expired(Exception):
    """The item's deadline passed before the device reached it."""


class Closed(Exception):
    """The batcher stopped before the item ran."""


@dataclass(frozen=True)
class Timing:
    """How an item went: time queued, and its share of the device time of its batch."""

    queue_s: float
    device_s: float
    batch_size: int


@dataclass(frozen=True)
class BatchDone:
    """What an observer (metrics) hears after each pipeline call."""

    name: str
    size: int
    device_s: float
    queue_s: tuple[float, ...]  # how long each item of the batch waited
    ok: bool


def timing_of(future: Future[Any]) -> Timing | None:
    timing: Timing | None = getattr(future, "spillway_timing", None)
    return timing


class Ewma:
    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value


@dataclass(frozen=True)
class Snapshot:
    queued: int
    running: int
    items_per_s: float | None
    batches: int
    items_done: int
    stretch: float = 1.0  # a 99% bound on finished / estimated, applied at admission


class Batcher(Generic[T, R]):
    """One per loaded model. ``run_batch`` (a callable, run on the batcher's one thread)
    or ``runners`` (one thread each) own the devices; each is given items of one shape
    and must return one result per item."""

    def __init__(self, name: str, run_batch: Callable[[list[T]], list[R]] | None,
                 policy: BatchPolicy, *, default_item_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic,
                 runners: Sequence[Runner[T, R]] = ()) -> None:
        self.name = name
        self.policy = policy
        self.runners: list[Runner[T, R]] = list(runners) or (
            [InThread(run_batch)] if run_batch is not None else [])
        if not self.runners:
            raise ValueError(f"{name}: a batcher needs run_batch or runners")
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: list[Pending[T]] = []
        self._closing = False
        # device slot -> (started, expected_s, items) of the batch it runs now
        self._running: dict[int, tuple[float, float, int]] = {}
        self._costs: dict[Hashable, CostModel] = {}  # shape -> its measured batch costs
        # How many times longer than estimated interactive items took (a 99% bound).
        self._stretch = Calibration(quantile=0.99, empty=1.0)
        self._arrivals = Arrivals()
        self._free_since = [float("-inf")] * len(self.runners)  # when each device freed
        self._rate = Ewma()  # items/s over all shapes
        self._default_item_s = default_item_s
        self._batches = 0
        self._items_done = 0
        self._threads = [threading.Thread(target=self._work, args=(slot,), daemon=True,
                                          name=f"batcher-{name}-{slot}")
                         for slot in range(len(self.runners))]
        # Told of each pipeline call, on the worker thread, before its results go out.
        self.on_batch: Callable[[BatchDone], None] | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop admitting, fail what has not started, let the running batch finish."""
        with self._cond:
            self._closing = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        for p in left:
            if p.claim():
                p.future.set_exception(Closed("server is shutting down"))
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    # -- admission -------------------------------------------------------------------
    def submit(self, items: Sequence[T], timeout_s: float, *, bulk: bool = False,
               due_in_s: float | None = None) -> list[Future[R]]:
        """Admit all items or none: a cheap check under the lock, no work done.
        ``due_in_s``: when the client needs them done (the router's deadline): no batch
        is then formed so large that it would make them late."""
        now = self._clock()
        with self._cond:
            if self._closing:
                raise Closed("server is shutting down")
            if self._live_locked() + len(items) > self.policy.max_queue:
                raise QueueFull(self._eta_locked(now, ()))
            predicted = self._eta_locked(now, items, include_bulk=bulk)
            due = math.inf if due_in_s is None else now + due_in_s
            entries = [Pending(item, now, now + timeout_s, bulk=bulk, predicted_s=predicted,
                               due=due)
                       for item in items]
            self._pending.extend(entries)
            self._arrivals.add(now, len(items))
            self._cond.notify_all()
        return [e.future for e in entries]

    # -- signals for the router ------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._cond:
            running = sum(n for _, _, n in self._running.values())
            return Snapshot(self._live_locked(), running, self._rate.value,
                            self._batches, self._items_done,
                            self._stretch_locked(self._clock()))

    def estimated_wait(self, items: Sequence[T], *, bulk: bool = False) -> float:
        """Seconds until these items would be done if admitted now (interactive items
        do not wait for queued bulk work), stretched by a 99% bound on how many times longer
        than estimated past items took (never shrunk: an early guess from the prior
        would otherwise excuse every later miss): what admission by deadline compares.
        With no items: until the queue drains, as estimated."""
        now = self._clock()
        with self._cond:
            raw = self._eta_locked(now, items, include_bulk=bulk)
            if not items:
                return raw
            return raw * self._stretch_locked(now)

    def _stretch_locked(self, now: float) -> float:
        return max(1.0, self._stretch.value(now))

    def _live_locked(self) -> int:
        """Queued items a client still waits for (a cancelled one is gone for good)."""
        return sum(1 for p in self._pending if not p.future.cancelled())

    def live_devices(self) -> int:
        return sum(1 for r in self.runners if r.ready)

    def _eta_locked(self, now: float, items: Sequence[T], include_bulk: bool = True) -> float:
        """The model's estimate (estimate.py's ``eta``) over the queue as it is now; no
        live device: never (the router spills or refuses)."""
        # In the order form_batch takes them: interactive items first (sorted is stable).
        ahead = [Waiting(p.item.shape_key, p.item.pixels, p.due - now)
                 for p in sorted(self._pending, key=lambda p: p.bulk)
                 if not p.future.cancelled() and (include_bulk or not p.bulk)]
        free_in = []  # per live device: when what it runs is done (0: idle now)
        for slot, runner in enumerate(self.runners):
            if runner.ready:
                run = self._running.get(slot)
                free_in.append(run[0] + run[1] - now if run else 0.0)
        return eta(ahead, [Waiting(i.shape_key, i.pixels) for i in items], free_in_s=free_in,
                   batch_s=self._batch_s, capacity=lambda px: capacity(px, self.policy),
                   forming_wait_s=self.policy.max_wait_s,
                   stretch=self._stretch_locked(now))

    def _batch_s(self, key: Hashable, pixels: int, size: int) -> float:
        """A batch's measured cost; an unseen shape costs what the cheapest seen one costs
        per pixel, or per batch when pixels say nothing (text-only chat); nothing seen
        yet: the prior per item."""
        model = self._costs.get(key)
        seen = model.seconds(size) if model is not None else None
        if seen is not None:
            return seen
        measured = [(s, m.pixels) for m in self._costs.values()
                    if (s := m.seconds(size)) is not None]
        per_pixel = [s / px for s, px in measured if px > 0]
        if per_pixel and pixels > 0:
            return min(per_pixel) * pixels
        return min(s for s, _ in measured) if measured else self._default_item_s * size

    def _hold_s(self, key: Hashable) -> float:
        model = self._costs.get(key)
        fit = model.fit if model is not None else None
        return company_hold(fit[0] if fit else 0.0, self._arrivals.per_s(self._clock()),
                            self.policy)

    # -- the device worker -----------------------------------------------------------
    def _next_batch(self, slot: int) -> list[Pending[T]] | None:
        runner = self.runners[slot]
        with self._cond:
            while True:
                now = self._clock()
                live, expired, _cancelled = split_expired(self._pending, now)
                self._pending = live
                for p in expired:
                    if p.claim():
                        p.future.set_exception(Expired("deadline passed while queued"))
                if self._closing:
                    return None
                if not runner.ready:  # down: the others take the work, _work revives it
                    self._cond.wait(0.2)
                    return []
                decision = form_batch(self._pending, now, self.policy,
                                      idle_s=now - self._free_since[slot], hold_s=self._hold_s,
                                      batch_s=self._batch_s,
                                      stretch=self._stretch_locked(now))
                if decision.take:
                    chosen = set(decision.take)
                    batch = [self._pending[i] for i in decision.take]
                    self._pending = [p for i, p in enumerate(self._pending) if i not in chosen]
                    first = batch[0].item
                    expected = self._batch_s(first.shape_key, first.pixels, len(batch))
                    self._running[slot] = (now, expected, len(batch))
                    return batch
                # Idle, look up each second: a device that died idle is noticed at once.
                self._cond.wait(decision.wait_s if decision.wait_s is not None else 1.0)

    def _work(self, slot: int) -> None:
        runner = self.runners[slot]
        while True:
            batch = self._next_batch(slot)
            if batch is None:
                return
            # A client that left between forming and now is dropped here, not computed.
            batch = [p for p in batch if p.claim()]
            ok = self._run(runner, batch) if batch else runner.ready
            with self._cond:
                self._running.pop(slot, None)
                self._free_since[slot] = self._clock()
            if not ok:  # its device died, under a batch or idle: brought back first
                try:
                    runner.recover()
                except Exception:
                    log.exception("%s: %s could not recover", self.name, runner.name)
                with self._cond:
                    self._cond.notify_all()

    def _run(self, runner: Runner[T, R], batch: list[Pending[T]]) -> bool:
        started = self._clock()
        try:
            results = runner.run([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every request of the batch gets the error
            self._report(batch, started, self._clock() - started, ok=False)
            # A device that died under its batch (not the batch's own error) gets the
            # items run again, once, on the next free one; a second death fails them.
            again = [p for i, p in enumerate(batch) if _may_run_again(exc, i)
                     and not p.retried]
            if again:
                log.warning("%s: %s died with a batch of %d; %d of its items run again on "
                            "the next free device", self.name, runner.name, len(batch),
                            len(again))
                with self._cond:
                    for p in again:
                        p.retried = True
                    self._pending[:0] = again
                    self._cond.notify_all()
            else:
                log.exception("%s: batch of %d failed", self.name, len(batch))
            for p in batch:
                if p not in again:
                    p.future.set_exception(exc)
            return False
        done = self._clock()
        elapsed = max(done - started, 1e-6)
        first = batch[0].item
        with self._cond:
            self._costs.setdefault(first.shape_key, CostModel(first.pixels)).add(
                len(batch), elapsed)
            # How far off the estimate was (finished / predicted), learnt from interactive
            # items (the ones admitted by deadline; bulk work yields to later arrivals by
            # design), and not from a retried item (its first device died under it).
            for p in batch:
                if p.predicted_s and not p.retried and not p.bulk:
                    self._stretch.add((done - p.enqueued) / p.predicted_s, done)
            self._rate.add(len(batch) / elapsed)
            self._batches += 1
            self._items_done += len(batch)
        self._report(batch, started, elapsed, ok=True)
        for p, result in zip(batch, results, strict=True):
            # Attached before the result, so whoever wakes on it can read it.
            p.future.spillway_timing = Timing(  # type: ignore[attr-defined]
                started - p.enqueued, elapsed / len(batch), len(batch))
            if isinstance(result, BaseException):  # this item failed alone (NotFinite)
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
        return True

    def _report(self, batch: list[Pending[T]], started: float, elapsed: float, ok: bool
                ) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(BatchDone(self.name, len(batch), elapsed,
                                    tuple(started - p.enqueued for p in batch), ok))
        except Exception:  # an observer must never stop the device thread
            log.exception("%s: batch observer failed", self.name)


def from_batch_failure(exc: BaseException, timeout_s: float, what: str) -> APIError:
    """What a request sees when its item failed in the batcher or on the device."""
    if isinstance(exc, Expired):
        return APIError(503, f"The request waited longer than {timeout_s:g} s in the local "
                        "queue.", type="server_error", code="queue_timeout",
                        headers=retry_headers(1.0))
    if isinstance(exc, Closed):
        return shutting_down()
    if isinstance(exc, NotFinite):  # the same prompt and seed fail the same way again
        return APIError(500, f"The local {what} made an image that is not finite (NaN) for "
                        "this prompt and seed; try another seed.", type="server_error",
                        code="pipeline_error", headers=NO_RETRY)
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return APIError(500, f"The local {what} failed: {type(exc).__name__}"
                    + (f": {detail}" if detail else ""), type="server_error",
                    code="pipeline_error")


def _may_run_again(exc: BaseException, row: int) -> bool:
    """The device died under the batch (``retry_elsewhere``), and this row may run again
    (``retry_rows``: None for every row; a row that streamed text is not among them)."""
    if not getattr(exc, "retry_elsewhere", False):
        return False
    rows = getattr(exc, "retry_rows", None)
    return rows is None or row in rows
