"""The ledger reads behind ``GET /v1/dashboard``, kept up to date incrementally.

Every open page refreshes every few seconds, and a busy day holds a million rows: a
refresh must not rescan the day. Each scope (every key's rows, or one key's) keeps
per-minute, per-route sums since the earliest minute the dashboard shows (UTC midnight,
or the start of the hour window when that began yesterday). A refresh adds only the rows
recorded since the last one (by id). A new day, and every ``FULL_RELOAD_S``, start the
scope over from one full query; that also picks up rows a multi-writer database (not
SQLite) committed out of id order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any

from server.ops.dashboard import window_start
from server.store.ledger import Ledger, MinuteBucket

FULL_RELOAD_S = 300.0


@dataclass
class _Scope:
    since: datetime
    day: date
    loaded_at: float
    last_id: int = 0
    sums: dict[tuple[datetime, str], MinuteBucket] = field(default_factory=dict)

    def add(self, buckets: Iterable[MinuteBucket]) -> None:
        for b in buckets:
            old = self.sums.get((b.minute, b.route))
            self.sums[(b.minute, b.route)] = b if old is None else replace(
                old, requests=old.requests + b.requests, images=old.images + b.images,
                cost_usd=old.cost_usd + b.cost_usd,
                cloud_equivalent_usd=old.cloud_equivalent_usd + b.cloud_equivalent_usd,
                latency_ms=old.latency_ms + b.latency_ms, errors=old.errors + b.errors)


def by_route(buckets: Iterable[MinuteBucket]) -> list[dict[str, Any]]:
    """Buckets summed per route, in the shape of ``Ledger.totals(group_by="route")``."""
    out: dict[str, dict[str, Any]] = {}
    for b in buckets:
        row = out.setdefault(b.route, {"group": b.route, "requests": 0, "images": 0,
                                       "cost_usd": 0.0, "cloud_equivalent_usd": 0.0})
        row["requests"] += b.requests
        row["images"] += b.images
        row["cost_usd"] += b.cost_usd
        row["cloud_equivalent_usd"] += b.cloud_equivalent_usd
    for row in out.values():
        row["savings_usd"] = row["cloud_equivalent_usd"] - row["cost_usd"]
    return [out[route] for route in sorted(out)]


class DashboardReads:
    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = ledger
        self.clock = clock
        self._lock = threading.Lock()  # refreshes run in worker threads
        self._scopes: dict[str | None, _Scope] = {}

    def read(self, now: datetime, only_key: str | None
             ) -> tuple[list[dict[str, Any]], list[MinuteBucket]]:
        """Today's totals by route (since UTC midnight) and the per-minute buckets of
        the window ending at ``now``, for every key (``None``) or one."""
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = window_start(now)
        since = min(midnight, start)
        with self._lock:
            scope = self._scopes.get(only_key)
            if (scope is None or scope.day != midnight.date() or since < scope.since
                    or self.clock() - scope.loaded_at > FULL_RELOAD_S):
                scope = self._scopes[only_key] = _Scope(since, midnight.date(), self.clock())
            upto = self.ledger.last_id()
            if upto > scope.last_id:
                scope.add(self.ledger.per_minute(scope.since, only_key=only_key,
                                                 ids=(scope.last_id, upto)))
                scope.last_id = upto
            for stale in [k for k in scope.sums if k[0] < since]:
                del scope.sums[stale]
            buckets = sorted(scope.sums.values(), key=lambda b: (b.minute, b.route))
        today = by_route(b for b in buckets if b.minute >= midnight)
        return today, [b for b in buckets if b.minute >= start]
