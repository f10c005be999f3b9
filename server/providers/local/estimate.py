"""How long queued work will take: measured batch costs per shape, the arrival rate, and
the estimate's own measured error. The ``Batcher`` holds these under its lock; the
arithmetic here is plain (``fit_line``, ``eta`` are pure functions).

Why batch costs and not a cost per item: an item is done when its whole batch is, and a
batch of n costs about ``overhead + n x per_item``, so a per-item average is optimistic
for an item that lands in a small batch and says nothing about how long to wait for
company. And why a learned error on top: whatever the model leaves out (forming waits,
encoding, the host's own load) shows up as finished-minus-predicted; admitting on the
estimate plus the p95 of that error is what keeps locally admitted work within its
deadline (``scripts/spill_bench.py`` reports the late share).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable


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
    """What the estimate missed by (finished minus predicted, seconds) for the last
    ``window`` items; ``margin_s`` is its ``quantile``: with under 20 errors seen, that is
    the worst of them (a fresh server that admitted a few jobs learns from those), with
    none, 0."""

    def __init__(self, window: int = 256, quantile: float = 0.95) -> None:
        self.quantile = quantile
        self._errors: deque[float] = deque(maxlen=window)
        self._margin: float | None = None

    def add(self, error_s: float) -> None:
        self._errors.append(error_s)
        self._margin = None

    def margin_s(self) -> float:
        if not self._errors:
            return 0.0
        if self._margin is None:
            ordered = sorted(self._errors)
            self._margin = ordered[min(len(ordered) - 1,
                                       math.ceil(self.quantile * len(ordered)) - 1)]
        return self._margin

    def __len__(self) -> int:
        return len(self._errors)


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


Shape = tuple[Hashable, int]  # (shape key, pixels per item)


def eta(ahead: Iterable[Shape], new: Iterable[Shape], *, running_left_s: float,
        devices: int, batch_s: Callable[[Hashable, int, int], float],
        capacity: Callable[[int], int], forming_wait_s: float = 0.0) -> float:
    """Seconds until the ``new`` items would be done if they joined the queue now (with
    none: until the queue is drained).

    Queued items ride in full batches of their shape; the new ones join the last batch
    of theirs. Every batch but the new items' last one is shared out over ``devices``
    with what the devices still run; that last batch runs on one device after them. A
    batch of the new items that is not full and has nothing ahead of its shape waits
    ``forming_wait_s`` for company first."""
    if devices <= 0:
        return math.inf
    counts: dict[Hashable, list[int]] = {}  # key -> [queued, new, pixels]
    for key, pixels in ahead:
        counts.setdefault(key, [0, 0, pixels])[0] += 1
    for key, pixels in new:
        counts.setdefault(key, [0, 0, pixels])[1] += 1
    work = running_left_s
    last = 0.0
    for key, (queued, joining, pixels) in counts.items():
        cap = capacity(pixels)
        total = queued + joining
        full, rest = divmod(total, cap)
        sizes = [cap] * full + ([rest] if rest else [])
        if joining:
            tail = batch_s(key, pixels, sizes[-1])
            if sizes[-1] < cap and queued == 0:
                tail += forming_wait_s
            last = max(last, tail)
            sizes = sizes[:-1]
        work += sum(batch_s(key, pixels, s) for s in sizes)
    return work / devices + last
