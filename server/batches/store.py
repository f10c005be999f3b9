"""The Batch API's storage: its tables, statuses, and how a restart recovers.

Storage. Tables in the ledger's database (``settings.ledger_url``), on an engine of our
own (SQLite: WAL, ``busy_timeout``, ``synchronous=FULL`` so a commit survives a power cut,
not only a killed process): ``files``, ``batches``, ``batch_items`` (one row per valid
input line, unique per (batch, custom_id)), ``batch_rejects`` (lines that failed
validation) and ``batch_worker_lease`` (which process runs the worker). File *contents*
live on disk next to the SQLite file (``<db stem>-files/<file id>``), written under a
temporary name, fsynced and renamed before their row is committed, so a row always points
at a whole file; an in-memory database gets a temporary folder.

Item life: ``pending -> sending -> done | failed``; ``pending -> cancelled``. An item is
``sending`` (and claimed by this process) before it runs; ``before_send`` writes the
upstream provider and model on it and commits *before* a cloud call. On start-up (after
taking the lease), items left ``sending`` with no upstream recorded are simply re-run
(local work is deterministic: every image item has a seed, assigned from (batch id,
custom_id) at validation when the body has none); items left ``sending`` with an upstream
recorded are failed with ``upstream_outcome_unknown``: no item is sent to a cloud twice.
Batches still ``validating`` are validated again, ``in_progress`` ones resume,
``finalizing`` ones are finalized again (output and error file ids are derived from the
batch id, so a second finalization overwrites the first's files). Every custom_id lands
exactly once in the output or the error file.

Only one process runs the worker for a database: it holds a lease row (host, pid,
heartbeat). Another server on the same database serves the API and leaves the work to
the holder; it takes over when the holder's heartbeat is stale, or at once when the
holder was a process on this host that no longer exists (a crash, ``kill -9``).

The parts: this module (tables, the shared ``Store``), files.py (uploads), lease.py (who
runs the worker), validate.py (input lines -> items), worker.py (running items),
finalize.py (output and error files), service.py (the facade the routes use).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from server.errors import APIError
from server.store import db
from server.store.db import is_memory_sqlite, open_engine
from server.wire import safejson

GENERATIONS, EDITS, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
ENDPOINTS = (GENERATIONS, EDITS, CHAT)
MAX_CUSTOM_ID = 512
UNKNOWN = "upstream_outcome_unknown"

# batch statuses
VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = "validating", "in_progress", "finalizing", \
    "completed"
FAILED, EXPIRED, CANCELLING, CANCELLED = "failed", "expired", "cancelling", "cancelled"
OPEN = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)
# item states
PENDING, SENDING, DONE, ITEM_FAILED, ITEM_CANCELLED = "pending", "sending", "done", "failed", \
    "cancelled"

# -- tables ---------------------------------------------------------------------------------

class JobsBase(DeclarativeBase):
    pass


class FileRow(JobsBase):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column("bytes", Integer)
    created_at: Mapped[int] = mapped_column(Integer)
    # The owner id of the key that made it (server/store/keys.py): "key:<id>", "admin"; None:
    # made on an open server.
    owner: Mapped[str | None] = mapped_column(String(100))


class BatchRow(JobsBase):
    __tablename__ = "batches"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    validated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[int] = mapped_column(Integer)
    in_progress_at: Mapped[int | None] = mapped_column(Integer)
    finalizing_at: Mapped[int | None] = mapped_column(Integer)
    completed_at: Mapped[int | None] = mapped_column(Integer)
    cancelling_at: Mapped[int | None] = mapped_column(Integer)
    cancelled_at: Mapped[int | None] = mapped_column(Integer)
    failed_at: Mapped[int | None] = mapped_column(Integer)
    expired_at: Mapped[int | None] = mapped_column(Integer)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    owner: Mapped[str | None] = mapped_column(String(100))


class ItemRow(JobsBase):
    __tablename__ = "batch_items"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_batch_items_custom_id"),
        Index("ix_batch_items_state", "batch_id", "state", "line"),
        Index("ix_batch_items_line", "batch_id", "line"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(64))
    line: Mapped[int] = mapped_column(Integer)
    line_id: Mapped[str] = mapped_column(String(64))  # "batch_req_…", the output line's id
    custom_id: Mapped[str] = mapped_column(String(MAX_CUSTOM_ID))
    method: Mapped[str] = mapped_column(String(8))
    url: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[float] = mapped_column(Float, default=0.0)
    claim: Mapped[str | None] = mapped_column(String(128))  # the worker running it
    upstream_provider: Mapped[str | None] = mapped_column(String(32))
    upstream_model: Mapped[str | None] = mapped_column(String(255))
    sent_at: Mapped[float | None] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(64))
    response: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the answer's body
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {code, message}
    error_code: Mapped[str | None] = mapped_column(String(64))
    finished_at: Mapped[float | None] = mapped_column(Float)


class RejectRow(JobsBase):
    """An input line that failed validation: it goes straight to the error file."""

    __tablename__ = "batch_rejects"
    __table_args__ = (Index("ix_batch_rejects_line", "batch_id", "line"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(String(64))
    line: Mapped[int] = mapped_column(Integer)
    line_id: Mapped[str] = mapped_column(String(64))
    custom_id: Mapped[str | None] = mapped_column(String(MAX_CUSTOM_ID))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(String(2000))


class LeaseRow(JobsBase):
    __tablename__ = "batch_worker_lease"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    heartbeat_at: Mapped[float] = mapped_column(Float)


# -- the shared low-level state ---------------------------------------------------------

class Store:
    """What every part shares: the engine (``synchronous=FULL``), the in-process write lock,
    the folder of file contents and this process's holder id (its claims and its lease)."""

    def __init__(self, url: str, files_dir: Path | None = None) -> None:
        u = make_url(url)
        sqlite = u.get_backend_name() == "sqlite"
        database = u.database or ""
        self.memory = is_memory_sqlite(url)
        self.lock = threading.Lock()
        self._temp_dir: Path | None = None
        if files_dir is None:
            if self.memory:
                self._temp_dir = files_dir = Path(tempfile.mkdtemp(prefix="spillway-files-"))
            elif sqlite:
                path = Path(database).expanduser()
                files_dir = path.with_name(path.stem + "-files")
            else:
                files_dir = Path("data") / "batch-files"
        self.files_dir = files_dir
        self.files_dir.mkdir(parents=True, exist_ok=True)
        # synchronous=FULL: a committed "sent upstream" mark must survive a power cut.
        self.engine: Engine = open_engine(url, synchronous="FULL")
        db.upgrade(self.engine)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        for partial in self.files_dir.glob(".*.partial"):
            with contextlib.suppress(OSError):
                partial.unlink()

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One writer at a time in this process (SQLite would serialize us anyway)."""
        with self.lock, Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        if self.memory:  # one shared connection: no interleaving
            with self.lock, Session(self.engine, expire_on_commit=False) as s:
                yield s
        else:
            with Session(self.engine, expire_on_commit=False) as s:
                yield s

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def close(self) -> None:
        self.engine.dispose()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


# -- small helpers -------------------------------------------------------------------------

def new_line_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


def result_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cancel_pending(s: Session, batch_id: str, code: str, message: str) -> None:
    s.execute(update(ItemRow).where(ItemRow.batch_id == batch_id, ItemRow.state == PENDING)
              .values(state=ITEM_CANCELLED, error={"code": code, "message": message},
                      error_code=code, finished_at=time.time(), claim=None)
              .execution_options(synchronize_session=False))


def request_counts(s: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Each batch's ``request_counts``: its items by state, and its rejected lines."""
    found = {b: {"total": 0, "completed": 0, "failed": 0} for b in batch_ids}
    if not batch_ids:
        return found
    for batch_id, state, n in s.execute(
            select(ItemRow.batch_id, ItemRow.state, func.count())
            .where(ItemRow.batch_id.in_(batch_ids))
            .group_by(ItemRow.batch_id, ItemRow.state)):
        c = found[batch_id]
        c["total"] += n
        if state == DONE:
            c["completed"] += n
        elif state in (ITEM_FAILED, ITEM_CANCELLED):
            c["failed"] += n
    for batch_id, n in s.execute(
            select(RejectRow.batch_id, func.count())
            .where(RejectRow.batch_id.in_(batch_ids)).group_by(RejectRow.batch_id)):
        found[batch_id]["total"] += n
        found[batch_id]["failed"] += n
    return found


def shown(value: str | None) -> str | None:
    """Text for a response: a row stored before strings were checked at the edge may hold
    a lone surrogate; it is shown escaped rather than failing the whole listing."""
    return None if value is None else safejson.shown(value)


def file_object(row: FileRow) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.size, "created_at": row.created_at,
            "filename": shown(row.filename), "purpose": row.purpose, "status": "processed",
            "expires_at": None, "status_details": None}


def batch_object(b: BatchRow, counts: dict[str, int]) -> dict[str, Any]:
    errors = None
    if b.errors:
        errors = {"object": "list", "data": b.errors}
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": errors,
        "input_file_id": shown(b.input_file_id), "completion_window": b.completion_window,
        "status": b.status, "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id, "created_at": b.created_at,
        "in_progress_at": b.in_progress_at, "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at, "completed_at": b.completed_at,
        "failed_at": b.failed_at, "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at, "cancelled_at": b.cancelled_at,
        "request_counts": counts,
        "metadata": None if b.meta is None else {
            shown(str(k)): shown(str(v)) for k, v in b.meta.items()},
    }


def not_found(what: str, ident: str, param: str) -> APIError:
    return APIError(404, f"No {what} found with id {ident[:100]!r}.", type="not_found_error",
                    param=param, code=f"{what}_not_found")
