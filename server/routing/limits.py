"""Upstream protection: per-model rate limits and per-provider circuit breakers.

Both take a clock so tests move time instead of sleeping. Neither does I/O."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from server.config import RateLimit

MINUTE = 60.0


@dataclass
class _Window:
    limit: RateLimit
    sent: deque[float] = field(default_factory=deque)  # send times, oldest first
    blocked_until: float = 0.0  # an upstream 429 said: not before then
    upstream_429s: int = 0


class RateLimiter:
    """Sliding windows per model: ``per_minute`` in any 60 s and ``burst`` in any
    ``burst_window_s``. Spillway never sends more than this upstream. Models without a
    configured limit are not limited."""

    def __init__(self, limits: dict[str, RateLimit],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._windows = {model: _Window(limit) for model, limit in limits.items()}
        self._clock = clock
        self._lock = threading.Lock()

    def wait_s(self, model: str) -> float:
        """0 when a request may leave now; else how long until one may."""
        with self._lock:
            return self._wait_locked(model, self._clock())

    def try_acquire(self, model: str) -> bool:
        """Take a slot if one is free now (check and record in one step)."""
        with self._lock:
            now = self._clock()
            if self._wait_locked(model, now) > 0:
                return False
            window = self._windows.get(model)
            if window is not None:
                window.sent.append(now)
            return True

    def upstream_limited(self, model: str, retry_after_s: float | None) -> None:
        """An upstream 429: honour its Retry-After (default: a burst window) and count it."""
        with self._lock:
            window = self._windows.get(model)
            if window is None:
                window = self._windows[model] = _Window(RateLimit(per_minute=10**9, burst=10**9))
            delay = retry_after_s if retry_after_s is not None else window.limit.burst_window_s
            window.blocked_until = max(window.blocked_until, self._clock() + delay)
            window.upstream_429s += 1

    def upstream_429s(self, model: str) -> int:
        window = self._windows.get(model)
        return window.upstream_429s if window else 0

    def _wait_locked(self, model: str, now: float) -> float:
        window = self._windows.get(model)
        if window is None:
            return 0.0
        while window.sent and window.sent[0] <= now - MINUTE:
            window.sent.popleft()
        waits = [window.blocked_until - now]
        if len(window.sent) >= window.limit.per_minute:
            waits.append(window.sent[-window.limit.per_minute] + MINUTE - now)
        in_burst = [t for t in window.sent if t > now - window.limit.burst_window_s]
        if len(in_burst) >= window.limit.burst:
            waits.append(in_burst[-window.limit.burst] + window.limit.burst_window_s - now)
        return max(0.0, *waits)


BreakerState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Opens after ``failures`` failures in a row; after ``cooldown_s`` lets one trial
    request through (half-open): its success closes the circuit, its failure reopens it."""

    def __init__(self, failures: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._streak = 0
        self._opened_at: float | None = None
        self._trial_out = False

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state_locked(self._clock())

    def _state_locked(self, now: float) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if now - self._opened_at < self.cooldown_s:
            return "open"
        return "half_open"

    def available(self) -> bool:
        """Could a request go now (without taking the half-open trial)?"""
        with self._lock:
            state = self._state_locked(self._clock())
            return state == "closed" or (state == "half_open" and not self._trial_out)

    def try_acquire(self) -> bool:
        """Claim the right to send: always when closed, once per cooldown when half-open."""
        with self._lock:
            state = self._state_locked(self._clock())
            if state == "closed":
                return True
            if state == "half_open" and not self._trial_out:
                self._trial_out = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._streak = 0
            self._opened_at = None
            self._trial_out = False

    def record_failure(self) -> None:
        with self._lock:
            now = self._clock()
            self._streak += 1
            if self._trial_out or self._streak >= self.failures:
                self._opened_at = now
            self._trial_out = False

    def release(self) -> None:
        """A claimed request that never reached upstream (e.g. rate limited locally)."""
        with self._lock:
            self._trial_out = False
