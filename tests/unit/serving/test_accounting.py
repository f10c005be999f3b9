"""The accounting every request and batch item ends with: one ledger row, quota reserved
before the work and settled after, however it ends (served, refused, cancelled)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from server.errors import APIError
from server.job import Served
from server.serving.accounting import Account, Accounting, Caller, row_for, served_by
from server.store.keys import KeyStore
from server.store.ledger import Ledger, UsageRow
from server.store.quotas import Limits, Quotas, Reservation


class SlowQuotas(Quotas):
    """Writes its counter as slowly as a busy database might."""

    delay_s = 0.0

    def reserve(self, owner: str, limits: Limits, images: int, usd: float, *,
                now: datetime | None = None) -> Reservation:
        time.sleep(self.delay_s)
        return super().reserve(owner, limits, images, usd, now=now)


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger("sqlite://") as led:
        yield led


def setup(ledger: Ledger, daily_images: int = 3) -> tuple[Accounting, SlowQuotas, list[UsageRow],
                                                           Caller]:
    keys = KeyStore(ledger)
    token = keys.create("team", daily_images=daily_images)
    info = keys.lookup(token)
    assert info is not None
    rows: list[UsageRow] = []

    async def record(row: UsageRow) -> None:
        rows.append(row)

    quotas = SlowQuotas(ledger)
    return Accounting(quotas, record), quotas, rows, Caller.of_key(info)


def used(quotas: Quotas, caller: Caller) -> int:
    assert caller.owner is not None
    return quotas.used(caller.owner, now=datetime.now(UTC))[0]


def test_a_served_request_is_one_row_and_counts_what_it_made(ledger: Ledger) -> None:
    accounting, quotas, rows, caller = setup(ledger)

    async def go() -> None:
        account = Account("/v1/images/generations", "auto", caller, images=2,
                          request_id="req_1")
        await accounting.reserve(account)
        assert used(quotas, caller) == 2  # reserved before the work runs

        async def work() -> tuple[str, Served]:
            return "pixels", Served("local", "local-first", cost_usd=0.001, queue_ms=5)

        assert (await served_by(account, work()))[0] == "pixels"
        await accounting.close(account)

    asyncio.run(go())
    (row,) = rows
    assert (row.route, row.outcome, row.status, row.images) == ("local", "ok", 200, 2)
    assert (row.key_name, row.request_id, row.reason) == ("team", "req_1", "local-first")
    assert row.cost_usd == pytest.approx(0.001)
    assert used(quotas, caller) == 2


def test_a_refused_request_is_a_row_and_gives_its_quota_back(ledger: Ledger) -> None:
    accounting, quotas, rows, caller = setup(ledger)

    async def go() -> None:
        account = Account("/v1/images/generations", "auto", caller, images=3)
        await accounting.reserve(account)

        async def work() -> tuple[str, Served]:
            raise APIError(429, "The local queue is full.", code="queue_full")

        with pytest.raises(APIError):
            await served_by(account, work())
        await accounting.close(account)

    asyncio.run(go())
    (row,) = rows
    assert (row.route, row.outcome, row.status, row.images) == ("none", "rejected", 429, 0)
    assert used(quotas, caller) == 0


def test_over_the_quota_is_429_insufficient_quota(ledger: Ledger) -> None:
    accounting, quotas, rows, caller = setup(ledger, daily_images=1)

    async def go() -> None:
        account = Account("/v1/images/generations", "auto", caller, images=2)
        with pytest.raises(APIError) as exc:
            await accounting.reserve(account)
        assert (exc.value.status, exc.value.code) == (429, "insufficient_quota")
        await accounting.close(account)

    asyncio.run(go())
    assert [(r.status, r.outcome) for r in rows] == [(429, "rejected")]
    assert used(quotas, caller) == 0


def test_cancelled_while_reserving_leaves_nothing_reserved(ledger: Ledger) -> None:
    """The client leaves while the quota counter is being written: the reservation still
    lands, and closing the cancelled account gives it back (never a leaked image)."""
    accounting, quotas, rows, caller = setup(ledger)
    quotas.delay_s = 0.3

    async def go() -> None:
        account = Account("/v1/images/generations", "auto", caller, images=2)
        task = asyncio.ensure_future(accounting.reserve(account))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert account.outcome == "cancelled"
        await accounting.close(account)

    asyncio.run(go())
    assert [(r.status, r.outcome) for r in rows] == [(499, "cancelled")]
    assert used(quotas, caller) == 0


def test_release_gives_back_without_a_row(ledger: Ledger) -> None:
    accounting, quotas, rows, caller = setup(ledger)

    async def go() -> None:
        account = Account("/v1/batches", "auto", caller, images=2, origin="batch")
        await accounting.reserve(account)
        await accounting.release(account)
        await accounting.release(account)  # twice is once

    asyncio.run(go())
    assert rows == []
    assert used(quotas, caller) == 0


def test_a_batch_row_says_so() -> None:
    account = Account("/v1/images/generations", "auto", Caller("team", "key:1", bulk=True),
                      images=1, request_id="batch_1/a", origin="batch")
    assert row_for(account).reason == "batch"
    account.served = Served("openai", "explicit", cost_usd=0.04)
    row = row_for(account)
    assert (row.reason, row.route, row.key_id, row.images) == ("batch:explicit", "openai",
                                                               "key:1", 1)
