"""Ledger rows in groups: a burst of rows is written in a few transactions, every row is
in the database when its writer's await returns, and a database that refuses loses none."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from server.store.group_writer import GroupWriter
from server.store.ledger import Ledger, UsageRecord, UsageRow


def row(i: int, status: int = 429) -> UsageRow:
    return UsageRow(endpoint="/v1/images/generations", model="auto", route="none",
                    upstream_model=None, outcome="rejected", status=status,
                    request_id=f"req_{i}")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.close()


def _commits(ledger: Ledger) -> list[int]:
    counted = [0]

    def on_commit(_conn: Any) -> None:
        counted[0] += 1

    event.listen(ledger.engine, "commit", on_commit)
    return counted


def test_a_burst_of_rows_goes_in_a_few_transactions_and_each_is_there_when_awaited(
        ledger: Ledger) -> None:
    writer = GroupWriter(ledger)
    commits = _commits(ledger)
    slow = threading.Event()
    record_many = ledger.record_many

    def slow_first(rows: Any) -> None:  # the first write takes long: the rest queue up
        if not slow.is_set():
            slow.set()
            time.sleep(0.2)
        record_many(rows)

    ledger.record_many = slow_first  # type: ignore[method-assign]
    missing: list[int] = []

    async def one(i: int) -> None:
        await writer.write(row(i))
        with ledger.reading() as s:
            if s.scalar(select(func.count()).where(UsageRecord.request_id == f"req_{i}")) != 1:
                missing.append(i)

    async def burst() -> None:
        await asyncio.gather(*(one(i) for i in range(300)))

    asyncio.run(burst())
    assert ledger.totals()[0]["requests"] == 300
    assert missing == []  # nobody's await returned before its row was in
    assert commits[0] <= 5, commits[0]  # not one transaction per row


def test_rows_of_a_refusing_database_are_held_and_the_writers_return(
        ledger: Ledger) -> None:
    writer = GroupWriter(ledger)

    def refuse(rows: Any) -> None:
        raise OSError(28, "No space left on device")

    record, record_many = ledger.record, ledger.record_many
    ledger.record = ledger.record_many = refuse  # type: ignore[method-assign,assignment]

    async def burst() -> None:
        await asyncio.wait_for(asyncio.gather(*(writer.write(row(i)) for i in range(50))),
                               timeout=10)

    asyncio.run(burst())
    assert ledger.held == 50 and ledger.write_error is not None
    ledger.record, ledger.record_many = record, record_many  # type: ignore[method-assign]
    assert ledger.flush_held() == 0
    assert ledger.totals()[0]["requests"] == 50


def test_flush_waits_for_queued_rows_and_the_thread_leaves_when_idle(ledger: Ledger) -> None:
    writer = GroupWriter(ledger, linger_s=0.05)
    for i in range(20):
        writer.submit(row(i))
    assert writer.flush(timeout_s=10)
    assert ledger.totals()[0]["requests"] == 20
    deadline = time.monotonic() + 5
    while any(t.name == "ledger-writer" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the writer thread never left"
        time.sleep(0.02)
    writer.submit(row(99))  # and comes back for the next row
    assert writer.flush(timeout_s=10)
    assert ledger.totals()[0]["requests"] == 21
