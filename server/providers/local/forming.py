"""Forming micro-batches: which queued items a free device takes next, and when. Pure
functions over the pending list; the ``Batcher`` (server/providers/local/batcher.py) holds
the lock and calls them."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class Item(Protocol):
    @property
    def shape_key(self) -> Hashable: ...

    @property
    def pixels(self) -> int: ...


T = TypeVar("T", bound=Item)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 32
    max_batch_pixels: int = 16 * 512 * 512
    max_wait_s: float = 0.010
    max_queue: int = 256
    # The most a freed device waits for company for a batch that is not full (it waits
    # only while the measured cost says a larger batch is worth it: ``company_hold``).
    max_hold_s: float = 0.050


@dataclass(eq=False)
class Pending(Generic[T]):
    item: T
    enqueued: float
    deadline: float
    future: Future[Any] = field(default_factory=Future)
    bulk: bool = False  # batch-job work: interactive items go first
    retried: bool = False  # its device died under it once; it runs again, once
    predicted_s: float | None = None  # the estimate at admission, to learn its error
    # When its client needs it done (clock time; the router's deadline less what happens
    # after the batcher): no batch grows so large that it would finish later than that.
    due: float = math.inf

    def claim(self) -> bool:
        """Take the item for running (or for failing): False if its client has left."""
        if self.retried:  # already running since its first try
            return not self.future.done()
        return self.future.set_running_or_notify_cancel()


@dataclass(frozen=True)
class Decision:
    take: tuple[int, ...] = ()  # indices into the pending list, in arrival order
    wait_s: float | None = None  # when nothing is taken: how long until it is worth looking again


def split_expired(pending: Sequence[Pending[T]], now: float
                  ) -> tuple[list[Pending[T]], list[Pending[T]], list[Pending[T]]]:
    """(live, expired, cancelled): the last two must never reach the device."""
    live, expired, cancelled = [], [], []
    for p in pending:
        if p.future.cancelled():
            cancelled.append(p)
        elif p.deadline <= now:
            expired.append(p)
        else:
            live.append(p)
    return live, expired, cancelled


def capacity(pixels: int, policy: BatchPolicy) -> int:
    """How many items of this size one batch holds (at least one)."""
    return max(1, min(policy.max_batch, policy.max_batch_pixels // max(1, pixels)))


def company_hold(overhead_s: float, arrivals_per_s: float, policy: BatchPolicy) -> float:
    """How long a freed device may wait for more items before running a batch that is
    not full. A batch of n costs about ``overhead + n x per_item`` (measured), so running
    k items now and m later costs one overhead more than running k + m together: waiting
    pays while it is shorter than that overhead and company is due within it (at least
    one arrival expected). Under light load it is 0 and a lone request runs at once."""
    if overhead_s <= 0 or arrivals_per_s * overhead_s < 1:
        return 0.0
    return min(overhead_s, policy.max_hold_s)


def tighter_due(soonest_due: float, done: float, due: float) -> float:
    """The due a batch must keep once an item due at ``due`` is in it and the batch
    would be ``done`` then: an item late even so constrains nothing (smaller batches
    would not save it, only slow the rest). ``estimate.eta`` keeps the same rule."""
    return min(soonest_due, due) if done <= due else soonest_due


def form_batch(pending: Sequence[Pending[T]], now: float, policy: BatchPolicy, *,
               idle_s: float = float("inf"),
               hold_s: Callable[[Hashable], float] | None = None,
               batch_s: Callable[[Hashable, int, int], float] | None = None,
               stretch: float = 1.0) -> Decision:
    """Pick the next batch: the oldest item's shape, in arrival order, within budget.
    Interactive items come before bulk ones: the oldest interactive item leads, and bulk
    items of its shape fill what room is left.

    Closes when the batch is full (item count or pixel budget), or when one more item
    (or waiting on) would make an item already in it finish after it is due (the batch's
    measured cost ``batch_s(key, pixels, n)``, stretched by the calibrated error
    ``stretch``; an item that is late even so does not count), or when the oldest item has
    waited ``max_wait_s`` and the device has been free (``idle_s``) for the hold its
    shape's measured cost calls for (``hold_s``); otherwise says how long to wait. The
    first item is always admitted, even when it alone is over the pixel budget, so
    nothing starves. ``estimate.eta`` plays the queue forward by the same rule.
    """
    if not pending:
        return Decision()
    order = [i for i, p in enumerate(pending) if not p.bulk] + \
        [i for i, p in enumerate(pending) if p.bulk]
    oldest = pending[order[0]]
    key = oldest.item.shape_key

    def finish(n: int, start: float = now) -> float:
        took = (start - now) + (batch_s(key, oldest.item.pixels, n) if batch_s else 0.0)
        return now + took * stretch

    take: list[int] = []
    pixels = 0
    soonest_due = math.inf
    full = False
    for i in order:
        p = pending[i]
        if p.item.shape_key != key:
            continue
        if take and (len(take) >= policy.max_batch
                     or pixels + p.item.pixels > policy.max_batch_pixels
                     or (batch_s is not None and finish(len(take) + 1) > soonest_due)):
            full = True
            break
        take.append(i)
        pixels += p.item.pixels
        if batch_s is not None:
            soonest_due = tighter_due(soonest_due, finish(len(take)), p.due)
    # With nothing more of this shape waiting, a batch that could not take one more is full.
    full = (full or len(take) >= policy.max_batch
            or pixels + oldest.item.pixels > policy.max_batch_pixels)
    if full:
        return Decision(take=tuple(take))
    waited = now - oldest.enqueued
    hold = hold_s(key) if hold_s is not None else 0.0
    wait_s = max(policy.max_wait_s - waited, hold - idle_s)
    if wait_s <= 0 or (batch_s is not None
                       and finish(len(take), now + wait_s) > soonest_due):
        return Decision(take=tuple(take))
    return Decision(wait_s=wait_s)
