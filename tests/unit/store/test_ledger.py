"""The usage ledger: sums, daily spend, persistence across restarts, concurrency, budgets."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from server.store.ledger import Ledger, UsageRow
from tests.ledger_rows import ledger_rows

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
YESTERDAY = NOW - timedelta(days=1)
GEN, EDIT, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"


def row(route: str, cost: float = 0.0, cloud: float = 0.0, *, at: datetime = NOW,
        endpoint: str = GEN, model: str = "gpt-image-1", key: str | None = "alice",
        **kw: object) -> UsageRow:
    return UsageRow(endpoint=endpoint, model=model, route=route,
                    upstream_model=None if route == "local" else model,
                    outcome="ok", status=200, cost_usd=cost, cloud_equivalent_usd=cloud,
                    key_name=key, key_id=key, at=at, **kw)  # type: ignore[arg-type]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.close()


SAMPLE = [
    row("local", 0.001, 0.042, images=2, device_seconds=0.5),
    row("local", 0.002, 0.042, images=1, device_seconds=1.25, key="bob"),
    row("openai", 0.042, 0.042, images=1),
    row("gemini", 0.039, 0.042, images=1, model="gemini-2.5-flash-image", key=None),
    row("openai", 0.0003, 0.0003, endpoint=CHAT, model="gpt-4o-mini",
        prompt_tokens=1000, completion_tokens=200),
    row("local", 0.0005, 0.0003, endpoint=CHAT, model="gpt-4o-mini",
        prompt_tokens=800, completion_tokens=100, device_seconds=0.25),
    row("openai", 0.011, 0.011, images=1, endpoint=EDIT, at=YESTERDAY),
]


def by_group(result: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    return {d["group"]: d for d in result}


def test_totals_by_route(ledger: Ledger) -> None:
    for r in SAMPLE:
        ledger.record(r)
    t = by_group(ledger.totals())
    assert set(t) == {"local", "openai", "gemini"}
    loc = t["local"]
    assert loc["requests"] == 3 and loc["images"] == 3
    assert loc["prompt_tokens"] == 800 and loc["completion_tokens"] == 100
    assert loc["device_seconds"] == pytest.approx(2.0, abs=1e-9)
    assert loc["cost_usd"] == pytest.approx(0.0035, abs=1e-9)
    assert loc["cloud_equivalent_usd"] == pytest.approx(0.0843, abs=1e-9)
    assert loc["savings_usd"] == pytest.approx(0.0843 - 0.0035, abs=1e-9)
    oa = t["openai"]
    assert oa["requests"] == 3 and oa["images"] == 2
    assert oa["cost_usd"] == pytest.approx(0.0533, abs=1e-9)
    assert oa["savings_usd"] == pytest.approx(0.0, abs=1e-9)
    gm = t["gemini"]
    assert gm["savings_usd"] == pytest.approx(0.003, abs=1e-9)
    assert sum(d["cost_usd"] for d in t.values()) == pytest.approx(
        sum(r.cost_usd for r in SAMPLE), abs=1e-9)


def test_totals_other_groupings(ledger: Ledger) -> None:
    for r in SAMPLE:
        ledger.record(r)
    models = by_group(ledger.totals(group_by="model"))
    assert set(models) == {"gpt-image-1", "gemini-2.5-flash-image", "gpt-4o-mini"}
    assert models["gpt-4o-mini"]["requests"] == 2
    assert models["gpt-4o-mini"]["prompt_tokens"] == 1800
    assert models["gpt-image-1"]["cost_usd"] == pytest.approx(0.056, abs=1e-9)

    endpoints = by_group(ledger.totals(group_by="endpoint"))
    assert {k: v["requests"] for k, v in endpoints.items()} == {GEN: 4, CHAT: 2, EDIT: 1}

    days = ledger.totals(group_by="day")
    assert [d["group"] for d in days] == ["2025-06-14", "2025-06-15"]
    assert days[0]["cost_usd"] == pytest.approx(0.011, abs=1e-9)
    assert days[1]["requests"] == 6

    keys = by_group(ledger.totals(group_by="key"))
    assert set(keys) == {"alice", "bob", None}
    assert keys["bob"]["device_seconds"] == pytest.approx(1.25, abs=1e-9)
    assert keys[None]["cost_usd"] == pytest.approx(0.039, abs=1e-9)

    with pytest.raises(ValueError, match="group_by"):
        ledger.totals(group_by="colour")


def test_totals_window(ledger: Ledger) -> None:
    for r in SAMPLE:
        ledger.record(r)
    today = NOW.replace(hour=0)
    assert sum(d["requests"] for d in ledger.totals(since=today)) == 6
    assert sum(d["requests"] for d in ledger.totals(until=today)) == 1
    assert ledger.totals(since=NOW + timedelta(seconds=1)) == []
    # A naive datetime is UTC; another offset means the same instant.
    assert sum(d["requests"] for d in ledger.totals(since=today.replace(tzinfo=None))) == 6
    plus2 = timezone(timedelta(hours=2))
    assert sum(d["requests"] for d in ledger.totals(until=today.astimezone(plus2))) == 1


def test_spent_today(ledger: Ledger) -> None:
    for r in SAMPLE:
        ledger.record(r)
    # yesterday's rows do not count
    assert ledger.spent_today_by_route(now=NOW) == pytest.approx(
        {"local": 0.0035, "openai": 0.0423, "gemini": 0.039}, abs=1e-9)
    assert ledger.spent_today_by_route(now=YESTERDAY)["openai"] == pytest.approx(0.011,
                                                                                abs=1e-9)
    # midnight boundaries: the first instant of the day counts, the next day's does not
    assert ledger.spent_today_by_route(now=NOW + timedelta(days=1)) == {}
    midnight = NOW.replace(hour=0)
    ledger.record(row("openai", 1.0, at=midnight))
    ledger.record(row("openai", 2.0, at=midnight + timedelta(days=1)))
    assert ledger.spent_today_by_route(now=NOW) == pytest.approx(
        {"local": 0.0035, "openai": 1.0423, "gemini": 0.039}, abs=1e-9)


def test_spent_today_defaults_to_now(ledger: Ledger) -> None:
    ledger.record(UsageRow(endpoint=GEN, model="m", route="openai", upstream_model="m",
                           outcome="ok", status=200, cost_usd=0.5))
    assert ledger.spent_today_by_route() == pytest.approx({"openai": 0.5})
    (r,) = ledger_rows(ledger)
    assert r.at is not None and r.at.tzinfo is not None
    assert abs((datetime.now(UTC) - r.at).total_seconds()) < 60


def test_rows_newest_first_and_round_trip(ledger: Ledger) -> None:
    ids = [ledger.record(r) for r in SAMPLE]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    got = ledger_rows(ledger)
    assert len(got) == len(SAMPLE)
    assert got[-1] == SAMPLE[-1]  # yesterday's row is the oldest; everything round-trips
    assert got[0] == SAMPLE[-2]  # same instant as the others, recorded last
    assert len(ledger_rows(ledger, limit=2)) == 2
    full = UsageRow(endpoint=CHAT, model="gpt-4o", route="openai", upstream_model="gpt-4o",
                    outcome="error", status=502, latency_ms=12.5, queue_ms=3.25,
                    request_id="req_1", key_name="k", reason="failover",
                    at=NOW + timedelta(hours=1))
    ledger.record(full)
    assert ledger_rows(ledger, 1) == [full]


def test_budget_survives_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    first = Ledger(url)
    first.record(row("openai", 12.5))
    first.record(row("gemini", 4.0))
    first.close()
    second = Ledger(url)
    try:
        assert second.spent_today_by_route(now=NOW) == pytest.approx(
            {"openai": 12.5, "gemini": 4.0})
    finally:
        second.close()


def test_wal_and_parent_folder(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "ledger.db"
    led = Ledger(f"sqlite:///{path}")
    try:
        led.record(row("openai", 1.0))
        with led.engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            busy = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        assert mode == "wal"
        assert sync == 1  # NORMAL
        assert busy is not None and int(busy) > 0
    finally:
        led.close()
    assert path.is_file()
    # WAL is a property of the file: a plain sqlite3 connection sees it too.
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT count(*) FROM usage").fetchone()[0] == 1
    raw.close()


@pytest.mark.parametrize("where", ["file", "file-two-writers", "memory"])
def test_concurrent_records_lose_nothing(tmp_path: Path, where: str) -> None:
    url = "sqlite://" if where == "memory" else f"sqlite:///{tmp_path / 'ledger.db'}"
    led = Ledger(url)
    # Two Ledger objects on one file stand in for two server processes: no shared lock,
    # SQLite's own locking (WAL + busy_timeout) keeps them apart.
    other = Ledger(url) if where == "file-two-writers" else led
    threads, per_thread = 8, 50
    ids: list[int] = []
    ids_lock = threading.Lock()
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            start.wait()
            writer = led if t % 2 else other
            mine = [writer.record(row("openai", 0.01, 0.02, key=f"t{t}"))
                    for _ in range(per_thread)]
            with ids_lock:
                ids.extend(mine)
        except BaseException as e:  # reported below
            errors.append(e)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    try:
        assert errors == []
        n = threads * per_thread
        assert len(set(ids)) == n
        (tot,) = led.totals()
        assert tot["requests"] == n
        assert tot["cost_usd"] == pytest.approx(0.01 * n, abs=1e-9)
        assert tot["savings_usd"] == pytest.approx(0.01 * n, abs=1e-9)
        keys = by_group(led.totals(group_by="key"))
        assert {k: v["requests"] for k, v in keys.items()} == {
            f"t{t}": per_thread for t in range(threads)}
        assert led.spent_today_by_route(now=NOW)["openai"] == pytest.approx(0.01 * n,
                                                                            abs=1e-9)
    finally:
        led.close()
        other.close()


def test_in_memory_ledger() -> None:
    with Ledger("sqlite://") as led:
        for r in SAMPLE:
            led.record(r)
        # every session sees the one database
        cloud = sum(v for k, v in led.spent_today_by_route(now=NOW).items() if k != "local")
        assert cloud == pytest.approx(0.0813, abs=1e-9)
        assert len(ledger_rows(led)) == len(SAMPLE)
        assert {d["group"] for d in led.totals()} == {"local", "openai", "gemini"}
    with Ledger("sqlite:///:memory:") as other:  # a fresh, empty one
        assert ledger_rows(other) == []
        assert other.spent_today_by_route() == {}
        assert other.totals() == []
