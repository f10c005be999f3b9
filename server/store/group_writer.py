"""Ledger rows written in groups: one transaction for every row that arrived while the
last one was being written.

Each request used to write its own row from the thread pool: one hop per request into a
pool of a handful of threads, one transaction each, and under a burst of 300 requests
the refused ones waited their turn behind every admitted one. Here one writer thread runs
while rows are waiting (and lingers ``linger_s`` for more, so a steady stream does not
start a thread per row); whatever queued up during a write goes in the next, as one
``executemany``. A caller awaits its row's group, so a row is in the database (or held
by the ledger to write later) before the response that it accounts for is sent.

Hand-written rather than a library: what it needs (a condition variable, a list and a
daemon thread that exits when idle) is shorter than any adapter to a task queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from server.store.ledger import Ledger, UsageRow

log = logging.getLogger(__name__)
Done = Callable[[], None]


class GroupWriter:
    def __init__(self, ledger: Ledger, *, max_group: int = 512, linger_s: float = 1.0
                 ) -> None:
        self.ledger = ledger
        self.max_group = max_group
        self.linger_s = linger_s
        self._cond = threading.Condition()
        self._pending: list[tuple[UsageRow, Done | None]] = []
        self._running = False
        self._writing = 0  # rows taken by the thread and not yet written

    def submit(self, row: UsageRow, done: Done | None = None) -> None:
        """Queue the row; ``done`` is called (on the writer thread) once its group is
        written or held."""
        with self._cond:
            self._pending.append((row, done))
            if self._running:
                self._cond.notify()
                return
            self._running = True
        threading.Thread(target=self._run, name="ledger-writer", daemon=True).start()

    async def write(self, row: UsageRow) -> None:
        """Queue the row and wait until its group is written (or held). Cancelling the
        wait does not take the row back: it is written all the same."""
        loop = asyncio.get_running_loop()
        written = loop.create_future()

        def done() -> None:
            loop.call_soon_threadsafe(_resolve, written)

        self.submit(row, done)
        await asyncio.shield(written)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._cond.wait(self.linger_s)
                if not self._pending:
                    self._running = False
                    self._cond.notify_all()
                    return
                group = self._pending[:self.max_group]
                del self._pending[:self.max_group]
                self._writing = len(group)
            try:
                # Never raises for a database that refuses: the rows are held instead.
                self.ledger.record_or_hold_many([row for row, _ in group])
            except Exception:  # noqa: BLE001 - a bug must not strand the waiting callers
                log.exception("ledger: a group of %d rows could not be written", len(group))
            with self._cond:
                self._writing = 0
                self._cond.notify_all()
            for _, done in group:
                # RuntimeError: the caller's event loop is closed, nobody waits any more.
                if done is not None:
                    with contextlib.suppress(RuntimeError):
                        done()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued row is written; False if ``timeout_s`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._writing,
                                       timeout_s)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
