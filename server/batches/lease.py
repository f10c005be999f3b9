"""Which process runs the worker for a database: one lease row (holder, host, pid,
heartbeat), and what a new holder does with the items a previous one left ``sending``.

Another server on the same database serves the API and leaves the work to the holder; it
takes over when the holder's heartbeat is stale, or at once when the holder was a process
on this host that no longer exists (a crash, ``kill -9``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from server.batches.store import (
    ITEM_FAILED,
    PENDING,
    SENDING,
    UNKNOWN,
    ItemRow,
    LeaseRow,
    Store,
    rowcount,
)

log = logging.getLogger(__name__)

LEASE_STALE_S = 30.0
HEARTBEAT_S = 5.0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """This process's claim on the worker; ``held`` says whether it has it now."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.held = False

    @property
    def holder(self) -> str:
        return self.store.holder

    def holder_gone(self, row: LeaseRow, now: float) -> bool:
        if now - row.heartbeat_at > LEASE_STALE_S:
            return True
        return (row.host == socket.gethostname() and row.pid != os.getpid()
                and not pid_alive(row.pid))

    def acquire(self) -> bool:
        now = time.time()
        mine = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat_at": now}
        with self.store.write() as s:
            row = s.get(LeaseRow, 1)
            if row is None:
                s.add(LeaseRow(id=1, **mine))
                try:
                    s.commit()
                except IntegrityError:
                    return False
                return True
            if row.holder == self.holder:
                return True
            if not self.holder_gone(row, now):
                return False
            res = s.execute(update(LeaseRow).where(LeaseRow.id == 1,
                                                   LeaseRow.holder == row.holder)
                            .values(**mine).execution_options(synchronize_session=False))
            s.commit()
            return rowcount(res) == 1

    def heartbeat(self) -> bool:
        with self.store.write() as s:
            res = s.execute(update(LeaseRow).where(LeaseRow.id == 1,
                                                   LeaseRow.holder == self.holder)
                            .values(heartbeat_at=time.time())
                            .execution_options(synchronize_session=False))
            s.commit()
            return rowcount(res) == 1

    def release(self) -> None:
        with self.store.write() as s:
            s.execute(delete(LeaseRow).where(LeaseRow.holder == self.holder))
            s.commit()

    async def beat(self) -> None:
        """The lease's heartbeat, on its own so a long validation or finalization in the
        worker's loop does not let the lease go stale."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if not self.held:
                continue
            try:
                kept = await asyncio.to_thread(self.heartbeat)
            except Exception:
                log.exception("batch worker: heartbeat failed")
                continue
            if not kept:
                log.warning("batch worker: lost the lease to another process")
                self.held = False

    def reconcile(self, claim: str | None, item_id: int | None = None) -> tuple[int, int]:
        """Items left ``sending`` (by a dead process, or by this one, abandoned at stop):
        back to pending when nothing went upstream, else failed as outcome-unknown."""
        now = time.time()
        where = [ItemRow.state == SENDING]
        if claim is not None:
            where.append(ItemRow.claim == claim)
        if item_id is not None:
            where.append(ItemRow.id == item_id)
        error = {"code": UNKNOWN, "message": (
            "The server stopped after this request was sent to a cloud provider and before "
            "its answer was stored. It is never sent twice, so its outcome is unknown.")}
        with self.store.write() as s:
            rerun = s.execute(update(ItemRow)
                              .where(*where, ItemRow.upstream_provider.is_(None))
                              .values(state=PENDING, claim=None)
                              .execution_options(synchronize_session=False))
            unknown = s.execute(update(ItemRow)
                                .where(*where, ItemRow.upstream_provider.is_not(None))
                                .values(state=ITEM_FAILED, claim=None, error=error,
                                        error_code=UNKNOWN, finished_at=now)
                                .execution_options(synchronize_session=False))
            s.commit()
            return rowcount(rerun), rowcount(unknown)
