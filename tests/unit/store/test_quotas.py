"""Quota reservations: atomic under concurrency, released when unused, seeded from the
ledger for a day that started before the counters existed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.store.ledger import Ledger, UsageRow
from server.store.quotas import Limits, QuotaExceeded, Quotas

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.fixture
def quotas(tmp_path: Path) -> Quotas:
    return Quotas(Ledger(f"sqlite:///{tmp_path / 'l.db'}"))


def test_concurrent_reservations_never_pass_the_quota(quotas: Quotas) -> None:
    def one(_: int) -> bool:
        try:
            quotas.reserve("key:1", Limits(7, None), 1, 0.0, now=NOW)
        except QuotaExceeded:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(one, range(64))) == 7


def test_what_was_not_used_is_given_back(quotas: Quotas) -> None:
    r = quotas.reserve("key:1", Limits(3, None), 3, 0.0, now=NOW)
    with pytest.raises(QuotaExceeded) as full:
        quotas.reserve("key:1", Limits(3, None), 1, 0.0, now=NOW)
    assert full.value.what == "images" and full.value.used == 3
    quotas.settle(r, 1, 0.0)  # two of the three images were never made
    assert quotas.used("key:1", now=NOW) == (1, 0.0)
    quotas.reserve("key:1", Limits(3, None), 2, 0.0, now=NOW)
    assert quotas.used("key:2", now=NOW) == (0, 0.0)  # another key: its own counter


def test_usd_reserves_the_most_a_request_could_cost_up_to_what_is_left(
        quotas: Quotas) -> None:
    limits = Limits(None, 1.0)
    first = quotas.reserve("key:1", limits, 0, 0.6, now=NOW)
    second = quotas.reserve("key:1", limits, 0, 0.6, now=NOW)  # admitted, for what is left
    assert (first.usd, second.usd) == (0.6, pytest.approx(0.4))
    with pytest.raises(QuotaExceeded) as over:  # in flight together they hold it all
        quotas.reserve("key:1", limits, 0, 0.01, now=NOW)
    assert over.value.what == "usd"
    quotas.settle(first, 0, 0.05)  # it cost far less than it might have
    quotas.settle(second, 0, 0.0)
    assert quotas.used("key:1", now=NOW) == (0, pytest.approx(0.05))
    quotas.reserve("key:1", limits, 0, 0.6, now=NOW)


def test_a_day_starts_from_what_the_ledger_already_counts(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.record(UsageRow("/v1/images/generations", "auto", "local", None, "ok", 200,
                           images=4, key_id="key:1", at=NOW))
    quotas = Quotas(ledger)
    with pytest.raises(QuotaExceeded):
        quotas.reserve("key:1", Limits(5, None), 2, 0.0, now=NOW)
    quotas.reserve("key:1", Limits(5, None), 1, 0.0, now=NOW)
