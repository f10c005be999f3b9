"""Incremental dashboard reads equal a full recount, across keys, refreshes and midnight."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from server.ops.dashboard import window_start
from server.ops.dashboard_reads import FULL_RELOAD_S, DashboardReads, by_route
from server.store.ledger import Ledger, UsageRow

KEYS = [None, "team-a", "team-b"]


def full(ledger: Ledger, now: datetime, key: str | None) -> tuple[object, object]:
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today = ledger.totals(since=midnight, group_by="route", only_key=key)
    for row in today:  # the fields the dashboard reads
        for extra in ("prompt_tokens", "completion_tokens", "device_seconds"):
            row.pop(extra)
    return today, ledger.per_minute(window_start(now), only_key=key)


def record(ledger: Ledger, rng: random.Random, now: datetime, n: int) -> None:
    for _ in range(n):
        route = rng.choice(["local", "local", "openai", "gemini", "none"])
        ok = route != "none"
        ledger.record(UsageRow(
            "/v1/images/generations", "auto", route, None, "ok" if ok else "rejected",
            200 if ok else 429, images=rng.randint(0, 4) if ok else 0,
            cost_usd=round(rng.uniform(0, 0.05), 6) if ok else 0.0,
            cloud_equivalent_usd=0.04 if ok else 0.0, latency_ms=rng.uniform(10, 900),
            key_id=rng.choice(KEYS[1:] + [None]),
            # mostly now; some late arrivals within the hour, some from earlier today
            at=now - timedelta(seconds=rng.choice([0, 0, 5, 120, 1800, 5000]))))


def approx(rows: object) -> object:
    if isinstance(rows, list):
        return [approx(r) for r in rows]
    if isinstance(rows, dict):
        return {k: pytest.approx(v) if isinstance(v, float) else v for k, v in rows.items()}
    return rows


def test_incremental_equals_full_recount() -> None:
    rng = random.Random(1)
    with Ledger("sqlite://") as ledger:
        reads = DashboardReads(ledger)
        now = datetime(2026, 11, 22, 15, 30, 10, tzinfo=UTC)
        for _step in range(8):
            record(ledger, rng, now, rng.randint(0, 30))
            for key in KEYS:
                today, buckets = reads.read(now, key)
                want_today, want_buckets = full(ledger, now, key)
                assert today == approx(want_today)
                assert [(b.minute, b.route, b.requests, b.images, b.errors)
                        for b in buckets] == [(b.minute, b.route, b.requests, b.images,
                                               b.errors) for b in want_buckets]
            now += timedelta(seconds=rng.choice([3, 3, 40, 700]))


def test_a_new_day_starts_over_and_the_window_reaches_back() -> None:
    with Ledger("sqlite://") as ledger:
        reads = DashboardReads(ledger)
        evening = datetime(2026, 11, 22, 23, 50, tzinfo=UTC)
        ledger.record(UsageRow("/v1/images/generations", "auto", "local", None, "ok", 200,
                               images=3, at=evening))
        today, _ = reads.read(evening, None)
        assert [r["images"] for r in today] == [3]
        after = evening + timedelta(minutes=20)  # 00:10 the next day
        ledger.record(UsageRow("/v1/images/generations", "auto", "openai", None, "ok", 200,
                               images=1, at=after))
        today, buckets = reads.read(after, None)
        assert [(r["group"], r["images"]) for r in today] == [("openai", 1)]
        # the hour window still shows yesterday's last minutes
        assert [(b.route, b.images) for b in buckets] == [("local", 3), ("openai", 1)]


def test_full_reload_picks_up_rows_behind_the_last_id() -> None:
    """A row whose id is below the last one read (a multi-writer database committing out
    of order) is found by the periodic full reload."""
    clock = [0.0]
    with Ledger("sqlite://") as ledger:
        reads = DashboardReads(ledger, clock=lambda: clock[0])
        now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
        ledger.record(UsageRow("/x", "auto", "local", None, "ok", 200, images=1, at=now))
        assert by_route(reads.read(now, None)[1])[0]["images"] == 1
        reads._scopes[None].last_id += 1  # as if a later id had been read first
        ledger.record(UsageRow("/x", "auto", "local", None, "ok", 200, images=2, at=now))
        assert by_route(reads.read(now, None)[1])[0]["images"] == 1  # not yet seen
        clock[0] += FULL_RELOAD_S + 1
        assert by_route(reads.read(now, None)[1])[0]["images"] == 3
