"""The key store shares the ledger's database, and on the in-memory ledger its one
connection: key reads and writes must take the ledger's turn like every other query."""

from __future__ import annotations

import threading

from server.store.keys import KeyStore
from server.store.ledger import Ledger, UsageRow


def test_keys_and_ledger_rows_from_many_threads_on_the_in_memory_ledger() -> None:
    with Ledger("sqlite://") as ledger:
        keys = KeyStore(ledger, ttl_s=0.0)  # every lookup reads the table
        token = keys.create("team")
        errors: list[BaseException] = []

        def looks() -> None:
            try:
                for _ in range(150):
                    assert keys.lookup(token) is not None
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def writes(n: int) -> None:
            try:
                for i in range(150):
                    ledger.record(UsageRow(endpoint="/v1/images/generations", model="m",
                                           route="local", upstream_model=None, outcome="ok",
                                           status=200, key_name="team", request_id=f"{n}-{i}"))
                    if i % 50 == 0:
                        keys.create(f"team-{n}-{i}")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=looks) for _ in range(3)] + \
            [threading.Thread(target=writes, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len(keys.list()) == 1 + 3 * 3


def test_the_cache_answers_without_a_query_only_while_fresh() -> None:
    """What the request path relies on to skip a thread hop: a fresh cache has every
    change this process made; a key made or revoked makes it stale at once."""
    with Ledger("sqlite://") as ledger:
        keys = KeyStore(ledger, ttl_s=60.0)
        assert not keys.fresh()
        assert keys.any_keys() is False and keys.fresh() and not keys.cached_any_keys()
        token = keys.create("team")
        assert not keys.fresh()  # made here: the cache must not answer until re-read
        assert keys.lookup(token) is not None
        assert keys.fresh() and keys.cached_lookup(token) is not None
        assert keys.cached_any_keys()
        keys.revoke("team")
        assert not keys.fresh()
        assert keys.lookup(token) is None and keys.cached_lookup(token) is None
