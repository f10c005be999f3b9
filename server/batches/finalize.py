"""Advancing and closing batches: cancel or expire what is pending, write the output and
error files (in input line order, under ids derived from the batch id, fsynced then
renamed), close the batch, and give the database back the space its answers took.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from sqlalchemy import func, select, update

from server.batches.store import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    DONE,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    OPEN,
    PENDING,
    SENDING,
    VALIDATING,
    BatchRow,
    FileRow,
    ItemRow,
    RejectRow,
    Store,
    cancel_pending,
    fsync_dir,
    result_file_id,
)

log = logging.getLogger(__name__)

# Free pages worth one VACUUM of a database made without auto_vacuum: a MiB, and half of it.
RECLAIM_BYTES = 2**20


def advance(store: Store) -> list[tuple[str, str]]:
    """Cancel and expire what is pending; return batches ready to finalize and how."""
    now = time.time()
    todo: list[tuple[str, str]] = []
    with store.write() as s:
        batches = list(s.scalars(select(BatchRow).where(BatchRow.status.in_(OPEN),
                                                        BatchRow.validated.is_(True))))
        if not batches:
            return todo
        for b in batches:
            if b.status == CANCELLING:
                cancel_pending(s, b.id, "batch_cancelled",
                               "The batch was cancelled before this request ran.")
            elif b.status == IN_PROGRESS and now >= b.expires_at:
                cancel_pending(s, b.id, "batch_expired", "The batch expired (its "
                               "completion window ended) before this request ran.")
        open_items = dict(s.execute(
            select(ItemRow.batch_id, func.count())
            .where(ItemRow.batch_id.in_([b.id for b in batches]),
                   ItemRow.state.in_((PENDING, SENDING)))
            .group_by(ItemRow.batch_id)).tuples().all())
        for b in batches:
            if b.status == VALIDATING:  # validated, and not one good line
                todo.append((b.id, FAILED))
            elif b.status == FINALIZING:
                todo.append((b.id, COMPLETED))
            elif open_items.get(b.id, 0):
                continue
            elif b.status == CANCELLING:
                todo.append((b.id, CANCELLED))
            elif s.scalar(select(func.count()).where(
                    ItemRow.batch_id == b.id, ItemRow.error_code == "batch_expired")):
                todo.append((b.id, EXPIRED))
            else:
                b.status, b.finalizing_at = FINALIZING, int(now)
                todo.append((b.id, COMPLETED))
        s.commit()
    return todo


def finalize(store: Store, batch_id: str, final: str) -> None:
    """Write the output and error files (input line order) and close the batch."""
    out_id = result_file_id(batch_id, "output")
    err_id = result_file_id(batch_id, "error")
    out_tmp = store.files_dir / f".{out_id}.partial"
    err_tmp = store.files_dir / f".{err_id}.partial"
    n_out = n_err = 0
    out_bytes = err_bytes = 0
    with store.read() as s:
        rejects = list(s.scalars(select(RejectRow).where(RejectRow.batch_id == batch_id)
                                 .order_by(RejectRow.line)))
        items = s.scalars(select(ItemRow).where(ItemRow.batch_id == batch_id)
                          .order_by(ItemRow.line).execution_options(yield_per=200))
        with out_tmp.open("w", encoding="utf-8") as out, \
                err_tmp.open("w", encoding="utf-8") as err:
            def write_err(line: dict[str, Any]) -> None:
                nonlocal n_err, err_bytes
                text = json.dumps(line, separators=(",", ":")) + "\n"
                err.write(text)
                n_err += 1
                err_bytes += len(text.encode())

            r = 0
            for item in items:
                while r < len(rejects) and rejects[r].line < item.line:
                    write_err(_reject_line(rejects[r]))
                    r += 1
                if item.state == DONE:
                    text = json.dumps(_response_line(item), separators=(",", ":")) + "\n"
                    out.write(text)
                    n_out += 1
                    out_bytes += len(text.encode())
                else:
                    write_err(_item_error_line(item))
                s.expunge(item)
            for reject in rejects[r:]:
                write_err(_reject_line(reject))
            for stream in (out, err):
                stream.flush()
                os.fsync(stream.fileno())
    now = int(time.time())
    kept: list[FileRow] = []
    for file_id, tmp, n, size, kind in ((out_id, out_tmp, n_out, out_bytes, "output"),
                                        (err_id, err_tmp, n_err, err_bytes, "error")):
        if n:
            os.replace(tmp, store.file_path(file_id))
            kept.append(FileRow(id=file_id, purpose="batch_output",
                                filename=f"{batch_id}_{kind}.jsonl", size=size,
                                created_at=now))
        else:
            tmp.unlink(missing_ok=True)
    fsync_dir(store.files_dir)
    with store.write() as s:
        b = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
        if b is None or b.status not in OPEN:
            return
        for kept_row in kept:
            kept_row.owner = b.owner
            s.merge(kept_row)
        b.output_file_id = out_id if n_out else None
        b.error_file_id = err_id if n_err else None
        b.status = final
        stamp = {COMPLETED: "completed_at", CANCELLED: "cancelled_at", FAILED: "failed_at",
                 EXPIRED: "expired_at"}[final]
        setattr(b, stamp, now)
        # The output file holds the answers now: the database need not keep the images.
        s.execute(update(ItemRow).where(ItemRow.batch_id == batch_id, ItemRow.state == DONE)
                  .values(response=None).execution_options(synchronize_session=False))
        s.commit()
    log.info("batch %s %s: %d answers, %d errors", batch_id, final, n_out, n_err)
    try:
        reclaim(store)
    except Exception as exc:  # space is given back at the next batch instead
        log.warning("batch worker: could not reclaim database space: %s", exc)


def reclaim(store: Store) -> None:
    """Give back to the disk the pages the batch's answers took (they are in its output
    file now), so the database shrinks instead of only growing. A database made before
    auto_vacuum was set is converted by one VACUUM, once its free pages are worth it."""
    if store.engine.dialect.name != "sqlite" or store.memory:
        return
    with store.lock, store.engine.connect() as conn:
        auto = conn.exec_driver_sql("PRAGMA auto_vacuum").scalar()
        free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
        pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar() or 0)
        size = int(conn.exec_driver_sql("PRAGMA page_size").scalar() or 4096)
        if auto == 2:  # incremental
            conn.commit()
            # sqlite3's execute() steps a statement once, and each step of this pragma
            # frees one page; executescript() runs it to the end.
            raw = conn.connection.driver_connection
            assert raw is not None
            raw.executescript("PRAGMA incremental_vacuum;")
        elif free * size > RECLAIM_BYTES and 2 * free > pages:
            log.info("batch worker: converting the database to auto_vacuum (%d MiB free "
                     "pages)", free * size // 2**20)
            conn.commit()
            auto_conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            auto_conn.exec_driver_sql("PRAGMA auto_vacuum=INCREMENTAL")
            auto_conn.exec_driver_sql("VACUUM")
        else:
            return
        # WAL mode: the main file shrinks at a checkpoint; the log is truncated too.
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()


def fail_batch(store: Store, batch_id: str, error: dict[str, Any]) -> None:
    """Close a batch as failed, with its reason; its pending items are cancelled."""
    now = time.time()
    with store.write() as s:
        b = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
        if b is None or b.status not in OPEN:
            return
        cancel_pending(s, batch_id, "batch_failed", error["message"])
        b.status, b.failed_at, b.validated = FAILED, int(now), True
        b.errors = [error]
        s.commit()


def _error_line(line_id: str, custom_id: str | None, code: str, message: str
                ) -> dict[str, Any]:
    return {"id": line_id, "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _response_line(item: ItemRow) -> dict[str, Any]:
    return {"id": item.line_id, "custom_id": item.custom_id,
            "response": {"status_code": item.status_code, "request_id": item.request_id,
                         "body": item.response}, "error": None}


def _item_error_line(item: ItemRow) -> dict[str, Any]:
    if item.status_code is not None and item.response is not None:
        return _response_line(item)
    error = item.error or {"code": "internal_error", "message": "The request did not run."}
    return {"id": item.line_id, "custom_id": item.custom_id, "response": None,
            "error": {"code": error.get("code"), "message": error.get("message")}}


def _reject_line(reject: RejectRow) -> dict[str, Any]:
    return _error_line(reject.line_id, reject.custom_id, reject.code, reject.message)
