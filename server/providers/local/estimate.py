"""How long queued work will take: measured batch costs per shape, the arrival rate, and
the estimate's own measured error. The ``Batcher`` holds these under its lock; the
arithmetic here is plain (``fit_line``, ``eta`` are pure functions).

Why batch costs and not a cost per item: an item is done when its whole batch is, and a
batch of n costs about ``overhead + n x per_item``, so a per-item average is optimistic
for an item that lands in a small batch and says nothing about how long to wait for
company. And why a learned error on top: whatever the model leaves out (forming waits,
encoding, the host's own load) shows up as finished-over-predicted; admitting on the
estimate stretched by a 99% bound on that ratio is what keeps locally admitted work within
its deadline (``scripts/spill_bench.py`` reports the late share).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from server.providers.local.forming import tighter_due


def fit_line(observations: Iterable[tuple[int, float]]) -> tuple[float, float] | None:
    """``(overhead_s, per_item_s)`` from ``(batch size, seconds)`` pairs by least squares,
    both kept at or above zero; one batch size seen: all of it per item. None: no data."""
    obs = list(observations)
    if not obs:
        return None
    n = len(obs)
    mean_x = sum(x for x, _ in obs) / n
    mean_y = sum(y for _, y in obs) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in obs)
    if sxx > 0:
        b = sum((x - mean_x) * (y - mean_y) for x, y in obs) / sxx
        a = mean_y - b * mean_x
        if a >= 0 and b > 0:
            return a, b
        if b > 0 >= a:  # through the origin instead: no overhead worth counting
            return 0.0, sum(x * y for x, y in obs) / sum(x * x for x, _ in obs)
    return 0.0, mean_y / mean_x  # one size (or noise): proportional to the size


class CostModel:
    """Seconds a batch of one shape takes, from its last ``window`` batches."""

    def __init__(self, pixels: int, window: int = 16) -> None:
        self.pixels = pixels
        self._obs: deque[tuple[int, float]] = deque(maxlen=window)
        self._fit: tuple[float, float] | None = None

    def add(self, size: int, seconds: float) -> None:
        self._obs.append((size, seconds))
        self._fit = fit_line(self._obs)

    @property
    def fit(self) -> tuple[float, float] | None:
        return self._fit

    def seconds(self, size: int) -> float | None:
        if self._fit is None:
            return None
        a, b = self._fit
        return a + b * size


class Calibration:
    """A bound that the next observation stays within ``quantile`` of the time, from the
    recent ones: the last ``window`` of them, none older than ``max_age_s``. The batcher
    feeds it how many times longer than estimated items took (finished / predicted, so
    the margin it gives grows with the wait, as the noise of a longer queue does); the
    router feeds it seconds. With none, ``empty``.

    Not the sample quantile: of n observations, the k-th largest is exceeded by the next
    one with probability k / (n + 1) whatever their distribution, so the sample p99 of
    120 (the second largest) is exceeded 1.65% of the time, and under overload nearly
    every admitted job sits at that edge. The bound is the k-th largest with the largest
    k that keeps k / (n + 1) within ``1 - quantile`` (the largest of them while n + 1 is
    under 1 / (1 - quantile)). The age limit keeps one bad stretch (a first call, a noisy
    minute) from ruling for long: were it kept until enough newer ones came, a margin
    too wide to admit anything would never see the newer ones."""

    def __init__(self, window: int = 256, quantile: float = 0.99, *, empty: float = 0.0,
                 max_age_s: float = 60.0) -> None:
        self.quantile = quantile
        self.empty = empty
        self.max_age_s = max_age_s
        self._seen: deque[tuple[float, float]] = deque(maxlen=window)  # (when, value)
        self._value: float | None = None

    def add(self, value: float, now: float) -> None:
        self._seen.append((now, value))
        self._value = None

    def value(self, now: float) -> float:
        while self._seen and self._seen[0][0] < now - self.max_age_s:
            self._seen.popleft()
            self._value = None
        if not self._seen:
            return self.empty
        if self._value is None:
            ordered = sorted(v for _, v in self._seen)
            k = max(1, math.floor((1.0 - self.quantile) * (len(ordered) + 1) + 1e-9))
            self._value = ordered[len(ordered) - k]
        return self._value

    def __len__(self) -> int:
        return len(self._seen)


class Arrivals:
    """Items admitted per second over the last ``window_s``."""

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._seen: deque[tuple[float, int]] = deque()
        self._count = 0

    def add(self, now: float, n: int) -> None:
        self._seen.append((now, n))
        self._count += n
        self._trim(now)

    def per_s(self, now: float) -> float:
        self._trim(now)
        return self._count / self.window_s

    def _trim(self, now: float) -> None:
        while self._seen and self._seen[0][0] < now - self.window_s:
            self._count -= self._seen.popleft()[1]


@dataclass(frozen=True)
class Waiting:
    """A queued item as the estimate sees it: its shape, and when its client needs it
    done, in seconds from now (inf: whenever)."""
    key: Hashable
    pixels: int
    due_s: float = math.inf


def eta(ahead: Sequence[Waiting], new: Sequence[Waiting], *, free_in_s: Sequence[float],
        batch_s: Callable[[Hashable, int, int], float], capacity: Callable[[int], int],
        forming_wait_s: float = 0.0, stretch: float = 1.0) -> float:
    """Seconds until the ``new`` items would be done if they joined the queue now (with
    none: until the queue is drained). ``free_in_s``: when each live device is done with
    what it runs (0: idle); no live device: never.

    Plays the queue forward the way ``form_batch`` takes it: the device free first takes
    the oldest item's shape, in order, up to a batch's capacity, and no further than keeps
    every item already in the batch done by when it is due, its time from now stretched
    by ``stretch`` (the calibrated error; ``tighter_due``). So a new item that would make
    an earlier one late rides in a batch of its own, later: an estimate given to one
    client is not broken by the next one's admission. A batch that starts
    on an idle device and is not full waits ``forming_wait_s`` for company first."""
    if not free_in_s:
        return math.inf
    queue = [*ahead, *new]
    if not queue:
        return min(max(0.0, f) for f in free_in_s)
    # Each shape's items in arrival order (indices into queue); the lead of the next
    # batch is the oldest item left of any shape.
    lines: dict[Hashable, deque[int]] = {}
    for i, w in enumerate(queue):
        lines.setdefault(w.key, deque()).append(i)
    devices = [max(0.0, f) for f in free_in_s]
    heapq.heapify(devices)
    first_new, placed, done_at = len(ahead), 0, 0.0
    while lines:
        start = heapq.heappop(devices)
        key = min(lines, key=lambda k: lines[k][0])
        line = lines[key]
        lead = queue[line[0]]
        cap = capacity(lead.pixels)
        taken: list[int] = []
        soonest_due = math.inf
        while line and len(taken) < cap:
            done = (start + batch_s(key, lead.pixels, len(taken) + 1)) * stretch
            if taken and done > soonest_due:
                break
            i = line.popleft()
            taken.append(i)
            soonest_due = tighter_due(soonest_due, done, queue[i].due_s)
        if not line:
            del lines[key]
        if start <= 0.0 and len(taken) < cap:
            start += forming_wait_s
        end = start + batch_s(key, lead.pixels, len(taken))
        heapq.heappush(devices, end)
        arrived = sum(1 for i in taken if i >= first_new)
        if arrived or not new:
            done_at = max(done_at, end)
        placed += arrived
        if new and placed == len(new):
            return done_at
    return done_at
