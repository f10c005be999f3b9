"""Durable batch jobs: the OpenAI Batch API's files, batches and items, and their worker.

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
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    Index,
    Integer,
    String,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import CursorResult, Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pipelines.vlm import ChatResult
from server import db, media, safejson
from server.auth import Caller, reserve_quota, settle_quota
from server.config import MediaSettings
from server.db import is_memory_sqlite, open_engine
from server.errors import APIError, bad_request, server_error
from server.keys import ADMIN_OWNER
from server.ledger import UsageRow
from server.protocol import (
    MAX_SEED,
    ImageEditRequest,
    ImageGenerationRequest,
    images_response,
    parse_size,
    to_edit_job,
    to_image_job,
)
from server.protocol_chat import (
    ChatRequest,
    completion_body,
    completion_id,
    max_tokens_of,
    parse_messages,
    stop_strings,
)
from server.providers.base import OutImage
from server.quotas import Reservation
from server.routes.chat import chat_job_from, check_chat_model
from server.routes.images import check_image_model, edit_sources
from server.storage import is_transient_storage

if TYPE_CHECKING:
    from server.dispatch import BeforeSend, Served
    from server.job import ImageJob
    from server.state import AppState

log = logging.getLogger(__name__)
T = TypeVar("T")

GENERATIONS, EDITS, CHAT = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
ENDPOINTS = (GENERATIONS, EDITS, CHAT)
COMPLETION_WINDOWS = {"24h": 24 * 3600}
# Upload limits (read at request time, so tests may lower them). The middleware lets a
# POST /v1/files body this much larger than MAX_FILE_BYTES through for multipart framing.
MAX_FILE_BYTES = 200 * 2**20
MAX_FILE_LINES = 50_000
UPLOAD_SLACK_BYTES = 16 * 2**20
MAX_METADATA_KEYS = 16
MAX_CUSTOM_ID = 512
CONCURRENCY = 4  # items in flight at once
ITEM_DEADLINE_S = 24 * 3600.0  # bulk work never spills to the cloud for being late
MAX_ATTEMPTS = 20  # tries of one item that meets a full queue / unready model
MAX_BACKOFF_S = 30.0
POLL_S = 1.0
LEASE_STALE_S = 30.0
HEARTBEAT_S = 5.0
MAX_BATCH_ERRORS = 1000  # entries kept in a failed batch's `errors`
# Free pages worth one VACUUM of a database made without auto_vacuum: a MiB, and half of it.
RECLAIM_BYTES = 2**20
TRANSIENT = frozenset({429, 503})
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
    # The owner id of the key that made it (server/keys.py): "key:<id>", "admin"; None:
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


# -- small helpers -------------------------------------------------------------------------

def new_line_id() -> str:
    return "batch_req_" + uuid.uuid4().hex


def item_seed(batch_id: str, custom_id: str) -> int:
    """The seed an image item without one gets: the same on every run of the batch."""
    digest = hashlib.sha256(f"{batch_id}\0{custom_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (MAX_SEED + 1)


def _result_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pydantic_message(exc: ValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid value.", None
    loc = ".".join(str(p) for p in errors[0]["loc"])
    msg = str(errors[0]["msg"])
    return (f"Invalid value for {loc!r}: {msg}." if loc else f"{msg}."), (loc or None)


def _error_line(line_id: str, custom_id: str | None, code: str, message: str
                ) -> dict[str, Any]:
    return {"id": line_id, "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


class _Abandoned(Exception):
    """Storage still refused when the worker stopped: the item is left to the next start."""


class _Reject(Exception):
    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id


@dataclass
class _Run:
    """What running one item learnt about its owner: the name its ledger row shows and
    the quota it reserved (settled when the item ends)."""

    key_name: str | None = None
    reservation: Reservation | None = None


@dataclass(frozen=True)
class _Claimed:
    id: int
    batch_id: str
    url: str
    custom_id: str
    body: dict[str, Any]
    attempts: int
    owner: str | None


def _shown(value: str | None) -> str | None:
    """Text for a response: a row stored before strings were checked at the edge may hold
    a lone surrogate; it is shown escaped rather than failing the whole listing."""
    if value is None or safejson.valid_text(value):
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def file_object(row: FileRow) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.size, "created_at": row.created_at,
            "filename": _shown(row.filename), "purpose": row.purpose, "status": "processed",
            "expires_at": None, "status_details": None}


def batch_object(b: BatchRow, counts: dict[str, int]) -> dict[str, Any]:
    errors = None
    if b.errors:
        errors = {"object": "list", "data": b.errors}
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": errors,
        "input_file_id": _shown(b.input_file_id), "completion_window": b.completion_window,
        "status": b.status, "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id, "created_at": b.created_at,
        "in_progress_at": b.in_progress_at, "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at, "completed_at": b.completed_at,
        "failed_at": b.failed_at, "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at, "cancelled_at": b.cancelled_at,
        "request_counts": counts,
        "metadata": None if b.meta is None else {
            _shown(str(k)): _shown(str(v)) for k, v in b.meta.items()},
    }


def _not_found(what: str, ident: str, param: str) -> APIError:
    return APIError(404, f"No {what} found with id {ident[:100]!r}.", type="not_found_error",
                    param=param, code=f"{what}_not_found")


# -- the service ----------------------------------------------------------------------------

class BatchService:
    """Files, batches and the worker. Blocking methods (the DB, the disk) run in threads."""

    def __init__(self, state: AppState, *, url: str | None = None,
                 files_dir: Path | None = None, concurrency: int = CONCURRENCY,
                 stop_wait_s: float | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.concurrency = concurrency
        self.stop_wait_s = (min(self.settings.shutdown_grace_s, 60.0) if stop_wait_s is None
                            else stop_wait_s)
        url = url or self.settings.ledger_url
        u = make_url(url)
        sqlite = u.get_backend_name() == "sqlite"
        database = u.database or ""
        self._memory = is_memory_sqlite(url)
        self._lock = threading.Lock()
        self._temp_dir: Path | None = None
        if files_dir is None:
            if self._memory:
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
        self._leased = False
        self._beat_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task[None] | None = None
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._orphans: set[asyncio.Task[tuple[int, int]]] = set()
        for partial in self.files_dir.glob(".*.partial"):
            with contextlib.suppress(OSError):
                partial.unlink()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One writer at a time in this process (SQLite would serialize us anyway)."""
        with self._lock, Session(self.engine, expire_on_commit=False) as s:
            yield s

    @contextmanager
    def _read(self) -> Iterator[Session]:
        if self._memory:  # one shared connection: no interleaving
            with self._lock, Session(self.engine, expire_on_commit=False) as s:
                yield s
        else:
            with Session(self.engine, expire_on_commit=False) as s:
                yield s

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = False
        self._main = asyncio.create_task(self._loop(), name="batch-worker")
        self._beat_task = asyncio.create_task(self._beat(), name="batch-lease")

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def stop(self) -> None:
        """Let in-flight items finish (bounded); pending ones wait for the next start."""
        self._stopping = True
        self.wake()
        if self._main is not None:  # it ends at its next turn (a long validation may delay it)
            await asyncio.wait({self._main}, timeout=self.stop_wait_s)
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        tasks = list(self._inflight.values())
        if tasks:
            log.info("batch worker: waiting up to %.0f s for %d items in flight",
                     self.stop_wait_s, len(tasks))
            _, late = await asyncio.wait(tasks, timeout=self.stop_wait_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=5)
        if self._beat_task is not None:
            self._beat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat_task
        if self._leased:
            # What this process abandoned: re-run next time, or (sent upstream) unknown.
            await asyncio.to_thread(self._reconcile, self.holder)
            await asyncio.to_thread(self._release_lease)
            self._leased = False
        self.engine.dispose()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _models_settled(self) -> bool:
        state = self.state
        return not state.shutting_down and (state.ready or state.load_error is not None)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch worker step failed; retrying")
                await asyncio.sleep(1.0)
            await self._sleep(POLL_S)

    async def _beat(self) -> None:
        """The lease's heartbeat, on its own so a long validation or finalization in the
        worker's loop does not let the lease go stale."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if not self._leased:
                continue
            try:
                kept = await asyncio.to_thread(self._heartbeat)
            except Exception:
                log.exception("batch worker: heartbeat failed")
                continue
            if not kept:
                log.warning("batch worker: lost the lease to another process")
                self._leased = False

    async def _step(self) -> None:
        if not self._leased:
            self._leased = await asyncio.to_thread(self._acquire_lease)
            if not self._leased:
                return
            rerun, unknown = await asyncio.to_thread(self._reconcile, None)
            if rerun or unknown:
                log.warning("batch worker: %d interrupted items to re-run, %d sent upstream "
                            "with an unknown outcome", rerun, unknown)
        # One batch's trouble is that batch's: it fails (with its reason), and every other
        # batch, of every key, goes on.
        for batch_id in await asyncio.to_thread(self._batches_to_validate):
            await self._guarded(batch_id, "validating", self._validate, batch_id)
        for batch_id, final in await asyncio.to_thread(self._advance):
            await self._guarded(batch_id, "finalizing", self._finalize, batch_id, final)
        slots = self.concurrency - len(self._inflight)
        if slots > 0 and self._models_settled() and not self._stopping:
            for item in await asyncio.to_thread(self._claim, slots):
                task = asyncio.create_task(self._execute(item), name=f"batch-item-{item.id}")
                self._inflight[item.id] = task
                task.add_done_callback(functools.partial(self._done, item.id))

    async def _guarded(self, batch_id: str, doing: str, step: Callable[..., None],
                       *args: Any) -> None:
        """Run one batch's step; an error that is not the storage's (which passes: the
        step is retried next turn) fails that batch alone, with its reason."""
        try:
            await asyncio.to_thread(step, *args)
        except Exception as exc:
            if is_transient_storage(exc):  # a full disk, a locked database: next turn
                log.error("batch %s: storage failed while %s (%s); retrying", batch_id,
                          doing, exc)
                return
            log.exception("batch %s failed while %s", batch_id, doing)
            await asyncio.to_thread(self._fail_batch, batch_id, {
                "code": "batch_failed", "line": None, "param": None,
                "message": f"The batch failed on the server while {doing}: "
                           f"{type(exc).__name__}."})

    def _fail_batch(self, batch_id: str, error: dict[str, Any]) -> None:
        now = time.time()
        with self._write() as s:
            b = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
            if b is None or b.status not in OPEN:
                return
            self._cancel_pending(s, batch_id, "batch_failed", error["message"])
            b.status, b.failed_at, b.validated = FAILED, int(now), True
            b.errors = [error]
            s.commit()

    async def _stored(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Write an item's state, retrying while storage refuses (a full disk): a finished
        result is held here until it is written, never thrown away or failed for it. At
        stop the item is abandoned as ``sending``, to be re-run (or, if it went to a cloud,
        reported unknown) at the next start."""
        delay = 0.5
        while True:
            try:
                return await asyncio.to_thread(write, *args, **kwargs)
            except Exception as exc:
                if not is_transient_storage(exc):
                    raise
                if self._stopping:
                    raise _Abandoned from exc
                log.error("batch worker: storage refused a write (%s); retrying in %.0f s",
                          exc, delay)
            await asyncio.sleep(delay)
            delay = min(MAX_BACKOFF_S, delay * 2)

    def _done(self, item_id: int, task: asyncio.Task[None]) -> None:
        self._inflight.pop(item_id, None)
        if not task.cancelled() and task.exception() is not None:
            # Its result could not be stored (the database refused for too long): the item
            # must not stay "sending" until the next start.
            log.error("batch item %d: %r; it will be re-run or reported", item_id,
                      task.exception())
            orphan = asyncio.create_task(asyncio.to_thread(self._reconcile, self.holder,
                                                           item_id))
            self._orphans.add(orphan)
            orphan.add_done_callback(self._orphans.discard)
        self.wake()

    # -- the lease --------------------------------------------------------------------------

    def _holder_gone(self, row: LeaseRow, now: float) -> bool:
        if now - row.heartbeat_at > LEASE_STALE_S:
            return True
        return (row.host == socket.gethostname() and row.pid != os.getpid()
                and not _pid_alive(row.pid))

    def _acquire_lease(self) -> bool:
        now = time.time()
        mine = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                "heartbeat_at": now}
        with self._write() as s:
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
            if not self._holder_gone(row, now):
                return False
            res = s.execute(update(LeaseRow).where(LeaseRow.id == 1,
                                                   LeaseRow.holder == row.holder)
                            .values(**mine).execution_options(synchronize_session=False))
            s.commit()
            return _rowcount(res) == 1

    def _heartbeat(self) -> bool:
        with self._write() as s:
            res = s.execute(update(LeaseRow).where(LeaseRow.id == 1,
                                                   LeaseRow.holder == self.holder)
                            .values(heartbeat_at=time.time())
                            .execution_options(synchronize_session=False))
            s.commit()
            return _rowcount(res) == 1

    def _release_lease(self) -> None:
        with self._write() as s:
            s.execute(delete(LeaseRow).where(LeaseRow.holder == self.holder))
            s.commit()

    def _reconcile(self, claim: str | None, item_id: int | None = None) -> tuple[int, int]:
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
        with self._write() as s:
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
            return _rowcount(rerun), _rowcount(unknown)

    # -- files ------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def save_upload(self, src: IO[bytes], filename: str, purpose: str, owner: str | None
                    ) -> dict[str, Any]:
        """Copy an upload to disk, counting bytes and lines against the limits."""
        max_bytes, max_lines = MAX_FILE_BYTES, MAX_FILE_LINES
        file_id = "file-" + uuid.uuid4().hex[:24]
        tmp = self.files_dir / f".{file_id}.partial"
        size = newlines = 0
        last = b"\n"
        try:
            with tmp.open("wb") as out:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise APIError(400, f"The file is larger than {max_bytes} bytes, the "
                                       "limit for a batch input file.", param="file",
                                       code="file_too_large")
                    newlines += chunk.count(b"\n")
                    last = chunk[-1:]
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            lines = newlines + (0 if last == b"\n" else 1)
            if size == 0:
                raise bad_request("The file is empty.", param="file", code="empty_file")
            if lines > max_lines:
                raise APIError(400, f"The file has {lines} lines; a batch input file may have "
                               f"at most {max_lines}.", param="file", code="too_many_lines")
            os.replace(tmp, self.file_path(file_id))
            _fsync_dir(self.files_dir)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        name = os.path.basename(filename.replace("\\", "/"))[:255]
        name = name if safejson.valid_text(name) and name.isprintable() else ""
        name = name or "upload.jsonl"
        row = FileRow(id=file_id, purpose=purpose, filename=name, size=size,
                      created_at=int(time.time()), owner=owner)
        with self._write() as s:
            s.add(row)
            s.commit()
        return file_object(row)

    def _visible(self, owner: str | None, caller: Caller) -> bool:
        return caller.admin or owner == caller.owner

    def get_file(self, file_id: str, caller: Caller, param: str = "file_id") -> FileRow:
        with self._read() as s:
            row = s.get(FileRow, file_id)
        if row is None or not self._visible(row.owner, caller) or \
                not self.file_path(file_id).is_file():
            raise _not_found("file", file_id, param)
        return row

    def delete_file(self, file_id: str, caller: Caller) -> dict[str, Any]:
        with self._read() as s:
            row = s.get(FileRow, file_id)
            if row is None or not self._visible(row.owner, caller):
                raise _not_found("file", file_id, "file_id")
            if s.scalar(select(BatchRow.id).where(BatchRow.input_file_id == file_id,
                                                  BatchRow.status.in_(OPEN)).limit(1)):
                raise bad_request(f"The file {file_id!r} is the input of a batch that is "
                                  "still running.", param="file_id", code="file_in_use")
        # The bytes first: on a full disk, deleting files is how space comes back, and
        # deleting the row needs room itself (SQLite writes its journal first). A row left
        # behind points at nothing, and get_file answers 404 for it.
        self.file_path(file_id).unlink(missing_ok=True)
        _fsync_dir(self.files_dir)
        with self._write() as s:
            s.execute(delete(FileRow).where(FileRow.id == file_id))
            s.commit()
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches: the API -------------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, window: str,
                     metadata: dict[str, str] | None, caller: Caller) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise bad_request(f"Unsupported endpoint {endpoint[:80]!r}: this server runs "
                              f"batches for {', '.join(ENDPOINTS)}.", param="endpoint",
                              code="unsupported_value")
        if window not in COMPLETION_WINDOWS:
            raise bad_request(f"Unsupported completion_window {window[:20]!r}: use '24h'.",
                              param="completion_window", code="unsupported_value")
        if metadata is not None and (
                len(metadata) > MAX_METADATA_KEYS
                or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
            raise bad_request("metadata takes up to 16 pairs, keys up to 64 characters and "
                              "values up to 512.", param="metadata")
        # Validated before anything is stored: a string no encoder takes would be stored
        # and then break every listing that shows it.
        for param, value in (("input_file_id", input_file_id), ("endpoint", endpoint),
                             ("completion_window", window),
                             *(("metadata", t) for kv in (metadata or {}).items() for t in kv)):
            if not safejson.valid_text(value):
                raise bad_request(f"{param} holds a lone surrogate, which is not text.",
                                  param=param)
        file = self.get_file(input_file_id, caller, "input_file_id")
        if file.purpose != "batch":
            raise bad_request(f"The file {input_file_id!r} has purpose {file.purpose!r}; a "
                              "batch needs a file uploaded with purpose 'batch'.",
                              param="input_file_id")
        now = int(time.time())
        row = BatchRow(id="batch_" + uuid.uuid4().hex, endpoint=endpoint,
                       input_file_id=input_file_id, completion_window=window,
                       status=VALIDATING, validated=False, created_at=now,
                       expires_at=now + COMPLETION_WINDOWS[window], meta=metadata,
                       owner=caller.owner)
        with self._write() as s:
            s.add(row)
            s.commit()
        return batch_object(row, {"total": 0, "completed": 0, "failed": 0})

    def _counts(self, s: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
        counts = {b: {"total": 0, "completed": 0, "failed": 0} for b in batch_ids}
        if not batch_ids:
            return counts
        for batch_id, state, n in s.execute(
                select(ItemRow.batch_id, ItemRow.state, func.count())
                .where(ItemRow.batch_id.in_(batch_ids))
                .group_by(ItemRow.batch_id, ItemRow.state)):
            c = counts[batch_id]
            c["total"] += n
            if state == DONE:
                c["completed"] += n
            elif state in (ITEM_FAILED, ITEM_CANCELLED):
                c["failed"] += n
        for batch_id, n in s.execute(
                select(RejectRow.batch_id, func.count())
                .where(RejectRow.batch_id.in_(batch_ids)).group_by(RejectRow.batch_id)):
            counts[batch_id]["total"] += n
            counts[batch_id]["failed"] += n
        return counts

    def _get_batch(self, s: Session, batch_id: str, caller: Caller) -> BatchRow:
        row = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
        if row is None or not self._visible(row.owner, caller):
            raise _not_found("batch", batch_id, "batch_id")
        return row

    def get_batch(self, batch_id: str, caller: Caller) -> dict[str, Any]:
        with self._read() as s:
            row = self._get_batch(s, batch_id, caller)
            return batch_object(row, self._counts(s, [row.id])[row.id])

    def list_batches(self, after: str | None, limit: int, caller: Caller) -> dict[str, Any]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        with self._read() as s:
            q = select(BatchRow).order_by(BatchRow.seq.desc()).limit(limit + 1)
            if not caller.admin:
                q = q.where(BatchRow.owner.is_(None) if caller.owner is None
                            else BatchRow.owner == caller.owner)
            if after:
                cursor = s.scalar(select(BatchRow.seq).where(BatchRow.id == after))
                if cursor is None:
                    raise _not_found("batch", after, "after")
                q = q.where(BatchRow.seq < cursor)
            rows = list(s.scalars(q))
            more = len(rows) > limit
            rows = rows[:limit]
            counts = self._counts(s, [r.id for r in rows])
            data = [batch_object(r, counts[r.id]) for r in rows]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    def cancel_batch(self, batch_id: str, caller: Caller) -> dict[str, Any]:
        now = int(time.time())
        with self._write() as s:
            row = self._get_batch(s, batch_id, caller)
            if row.status in (VALIDATING, IN_PROGRESS):
                row.status, row.cancelling_at = CANCELLING, now
                self._cancel_pending(s, row.id, "batch_cancelled",
                                     "The batch was cancelled before this request ran.")
                s.commit()
            elif row.status not in (CANCELLING, CANCELLED):
                # 400, not OpenAI's 409: the SDK would retry a 409.
                raise bad_request(f"The batch is {row.status}; only a validating or "
                                  "in-progress batch can be cancelled.", param="batch_id",
                                  code="batch_not_cancellable")
            result = batch_object(row, self._counts(s, [row.id])[row.id])
        return result

    @staticmethod
    def _cancel_pending(s: Session, batch_id: str, code: str, message: str) -> None:
        s.execute(update(ItemRow).where(ItemRow.batch_id == batch_id, ItemRow.state == PENDING)
                  .values(state=ITEM_CANCELLED, error={"code": code, "message": message},
                          error_code=code, finished_at=time.time(), claim=None)
                  .execution_options(synchronize_session=False))

    # -- validation ---------------------------------------------------------------------------

    def _batches_to_validate(self) -> list[str]:
        with self._read() as s:
            return list(s.scalars(select(BatchRow.id).where(
                BatchRow.validated.is_(False), BatchRow.status.in_((VALIDATING, CANCELLING)))
                .order_by(BatchRow.seq)))

    def _validate(self, batch_id: str) -> None:
        """Parse every line: valid ones become pending items, the rest rejects."""
        with self._read() as s:
            batch = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
        if batch is None or batch.validated:
            return
        items: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        fatal: dict[str, Any] | None = None
        seen: dict[str, int] = {}
        try:
            with self.file_path(batch.input_file_id).open("rb") as f:
                for n, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        items.append(self._check_line(n, raw, batch, seen))
                    except _Reject as bad:
                        rejects.append({"batch_id": batch_id, "line": n,
                                        "line_id": new_line_id(),
                                        "custom_id": bad.custom_id, "code": bad.code,
                                        "message": f"line {n}: {bad.message}"[:2000]})
                    except Exception as exc:  # one line's surprise is that line's error
                        log.exception("batch %s: line %d could not be checked", batch_id, n)
                        rejects.append({"batch_id": batch_id, "line": n,
                                        "line_id": new_line_id(), "custom_id": None,
                                        "code": "invalid_request",
                                        "message": f"line {n}: this line could not be "
                                                   f"processed ({type(exc).__name__})."})
        except OSError:
            fatal = {"code": "file_not_found", "line": None, "param": "input_file_id",
                     "message": f"The input file {batch.input_file_id} cannot be read."}
        if fatal is None and not items and not rejects:
            fatal = {"code": "empty_file", "line": None, "param": "input_file_id",
                     "message": "The input file has no requests."}
        now = int(time.time())
        with self._write() as s:
            row = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
            if row is None or row.validated:
                return
            s.execute(delete(ItemRow).where(ItemRow.batch_id == batch_id))
            s.execute(delete(RejectRow).where(RejectRow.batch_id == batch_id))
            for start in range(0, len(items), 1000):
                s.execute(insert(ItemRow), items[start:start + 1000])
            for start in range(0, len(rejects), 1000):
                s.execute(insert(RejectRow), rejects[start:start + 1000])
            row.validated = True
            if row.status == CANCELLING:
                self._cancel_pending(s, batch_id, "batch_cancelled",
                                     "The batch was cancelled before this request ran.")
            elif items:
                row.status, row.in_progress_at = IN_PROGRESS, now
            else:  # every line is bad: _advance fails the batch (and writes its error file)
                row.errors = [fatal] if fatal else [
                    {"code": r["code"], "message": r["message"], "param": None,
                     "line": r["line"]} for r in rejects[:MAX_BATCH_ERRORS]]
            s.commit()
        log.info("batch %s: %d requests, %d bad lines", batch_id, len(items), len(rejects))

    def _check_line(self, n: int, raw: bytes, batch: BatchRow, seen: dict[str, int]
                    ) -> dict[str, Any]:
        try:
            # Nesting limit and valid Unicode: a line nested 100,000 deep, or a custom_id
            # with a lone surrogate, is this line's error, not the worker's.
            obj = safejson.parse(raw)
        except safejson.JSONError as exc:
            where = f" (at {exc.path})" if exc.path else ""
            raise _Reject("invalid_json_line", f"{exc.message}{where}") from exc
        if not isinstance(obj, dict):
            raise _Reject("invalid_json_line", "a line must be a JSON object.")
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise _Reject("missing_custom_id", "custom_id is missing or not a non-empty "
                          "string.", custom_id if isinstance(custom_id, str) else None)
        if len(custom_id) > MAX_CUSTOM_ID:
            raise _Reject("invalid_custom_id",
                          f"custom_id is longer than {MAX_CUSTOM_ID} characters.")
        if custom_id in seen:
            raise _Reject("duplicate_custom_id", f"custom_id {custom_id!r} is already used on "
                          f"line {seen[custom_id]}.", custom_id)
        seen[custom_id] = n
        if obj.get("method") != "POST":
            raise _Reject("invalid_method", f"method must be 'POST', not "
                          f"{str(obj.get('method'))[:20]!r}.", custom_id)
        if obj.get("url") != batch.endpoint:
            raise _Reject("invalid_url", f"url {str(obj.get('url'))[:80]!r} is not this "
                          f"batch's endpoint {batch.endpoint!r}.", custom_id)
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _Reject("invalid_body", "body must be a JSON object.", custom_id)
        try:
            body = self._check_body(batch.endpoint, body, batch.id, custom_id)
        except APIError as err:
            raise _Reject(err.code or "invalid_request", err.message, custom_id) from err
        except ValidationError as exc:
            raise _Reject("invalid_value", _pydantic_message(exc)[0], custom_id) from exc
        return {"batch_id": batch.id, "line": n, "line_id": new_line_id(),
                "custom_id": custom_id, "method": "POST", "url": batch.endpoint,
                "body": body, "state": PENDING, "attempts": 0, "not_before": 0.0}

    def _check_body(self, endpoint: str, body: dict[str, Any], batch_id: str,
                    custom_id: str) -> dict[str, Any]:
        """The endpoint's own checks, short of fetching images; image bodies get a seed."""
        settings = self.settings
        if endpoint == CHAT:
            chat = ChatRequest.model_validate(body)
            if chat.stream:
                raise bad_request("Streaming is not available in a batch; omit 'stream'.",
                                  param="stream", code="unsupported_value")
            check_chat_model(self.state, chat.model)
            parsed = parse_messages(chat.messages)
            media.check_count(len(parsed.images), settings.media, param="messages")
            max_tokens_of(chat, settings.vlm.default_max_tokens, settings.vlm.max_tokens_cap)
            stop_strings(chat.stop)
            return body
        if endpoint == GENERATIONS:
            gen = ImageGenerationRequest.model_validate(body)
            check_image_model(gen.model)
            to_image_job(gen, gen.model or "auto", settings.images)
        else:
            fields = dict(body)
            _edit_refs(fields.pop("images", None), settings.media)
            if "mask" in fields:
                raise bad_request("Masks (inpainting) are not supported.", param="mask",
                                  code="unsupported_value")
            edit = ImageEditRequest.model_validate(fields)
            check_image_model(edit.model)
            to_image_job(edit.model_copy(update={"size": "auto"}), edit.model or "auto",
                         settings.images)
            if edit.size not in (None, "", "auto"):
                parse_size(edit.size, settings.images)
        if body.get("seed") is None:
            body = {**body, "seed": item_seed(batch_id, custom_id)}
        return body

    # -- the worker: claiming, running, storing ----------------------------------------------

    def _claim(self, slots: int) -> list[_Claimed]:
        now = time.time()
        with self._write() as s:
            rows = s.execute(
                select(ItemRow.id, ItemRow.batch_id, ItemRow.url, ItemRow.custom_id,
                       ItemRow.body, ItemRow.attempts, BatchRow.owner)
                .join(BatchRow, BatchRow.id == ItemRow.batch_id)
                .where(BatchRow.status == IN_PROGRESS, ItemRow.state == PENDING,
                       ItemRow.not_before <= now, ItemRow.id.not_in(list(self._inflight)))
                .order_by(BatchRow.seq, ItemRow.line).limit(slots)).all()
            claimed = []
            for r in rows:
                res = s.execute(update(ItemRow).where(ItemRow.id == r.id,
                                                      ItemRow.state == PENDING)
                                .values(state=SENDING, claim=self.holder)
                                .execution_options(synchronize_session=False))
                if _rowcount(res) == 1:
                    claimed.append(_Claimed(r.id, r.batch_id, r.url, r.custom_id, r.body,
                                            r.attempts, r.owner))
            s.commit()
        return claimed

    def _record_send(self, item_id: int, provider: str, model: str) -> bool:
        """Committed before the cloud call; False if the item is no longer ours."""
        with self._write() as s:
            res = s.execute(update(ItemRow).where(
                ItemRow.id == item_id, ItemRow.state == SENDING, ItemRow.claim == self.holder,
                ItemRow.upstream_provider.is_(None))
                .values(upstream_provider=provider, upstream_model=model, sent_at=time.time())
                .execution_options(synchronize_session=False))
            s.commit()
            return _rowcount(res) == 1

    def _finish(self, item_id: int, **values: Any) -> bool:
        with self._write() as s:
            res = s.execute(update(ItemRow).where(
                ItemRow.id == item_id, ItemRow.state == SENDING, ItemRow.claim == self.holder)
                .values(claim=None, finished_at=time.time(), **values)
                .execution_options(synchronize_session=False))
            s.commit()
            return _rowcount(res) == 1

    def _store_images(self, item_id: int, job: ImageJob, images: list[OutImage]) -> bool:
        data = [{"revised_prompt": None, "seed": im.seed,
                 "b64_json": base64.b64encode(im.data).decode("ascii")} for im in images]
        return self._finish(item_id, state=DONE, status_code=200, response=images_response(
            job, data), request_id="req_" + uuid.uuid4().hex)

    async def _execute(self, item: _Claimed) -> None:
        started = time.monotonic()
        sent: list[str] = []
        dispatcher = self.state.require_dispatcher()

        async def before_send(provider: str, model: str) -> None:
            # The dispatcher may try a second cloud after a failure: never for a batch item.
            if sent or not await self._stored(self._record_send, item.id, provider, model):
                dispatcher.breakers[provider].release()
                raise APIError(502, "This batch request was already sent upstream once (or "
                               "is no longer this worker's); it is not sent again.",
                               type="server_error", code="upstream_send_refused")
            sent.append(provider)

        run = _Run(key_name=item.owner if item.owner == ADMIN_OWNER else None)
        try:
            served, images_made, model = await self._perform(item, before_send, run)
        except (asyncio.CancelledError, _Abandoned):
            await settle_quota(self.state, run.reservation, 0, 0.0)
            raise
        except APIError as err:
            if (not sent and err.status in TRANSIENT and err.code != "insufficient_quota"
                    and item.attempts + 1 < MAX_ATTEMPTS):
                delay = min(MAX_BACKOFF_S, 0.5 * 2 ** item.attempts)
                with contextlib.suppress(ValueError):
                    delay = min(MAX_BACKOFF_S,
                                max(delay, float(err.headers.get("Retry-After", ""))))
                await self._stored(self._retry_later, item.id, delay)
                await settle_quota(self.state, run.reservation, 0, 0.0)
                return
            await self._stored(self._finish, item.id, state=ITEM_FAILED,
                               status_code=err.status, response=err.body(),
                               error_code=err.code, request_id="req_" + uuid.uuid4().hex)
            await self._account(item, run, None, 0, err.status, started,
                                str(item.body.get("model") or "auto"))
            return
        except Exception as exc:
            log.exception("batch item %s/%s failed", item.batch_id, item.custom_id)
            failure = server_error(f"The request failed on the server: {type(exc).__name__}.")
            await self._stored(self._finish, item.id, state=ITEM_FAILED, status_code=500,
                               response=failure.body(), error_code=failure.code,
                               request_id="req_" + uuid.uuid4().hex)
            await settle_quota(self.state, run.reservation, 0, 0.0)
            return
        await self._account(item, run, served, images_made, 200, started, model)

    def _retry_later(self, item_id: int, delay: float) -> None:
        with self._write() as s:
            s.execute(update(ItemRow).where(ItemRow.id == item_id, ItemRow.state == SENDING,
                                            ItemRow.claim == self.holder)
                      .values(state=PENDING, claim=None, attempts=ItemRow.attempts + 1,
                              not_before=time.time() + delay)
                      .execution_options(synchronize_session=False))
            s.commit()

    async def _check_owner(self, item: _Claimed, run: _Run, images: int, usd: float
                           ) -> None:
        """The key that made the batch: still active; its daily quota reserved. The
        admin key's batches (and an open server's) run unmetered."""
        if item.owner is None or item.owner == ADMIN_OWNER:
            return
        keys = self.state.keys
        info = None if keys is None else await asyncio.to_thread(keys.by_owner, item.owner)
        if info is None or not info.active:
            shown = f"{info.name!r} " if info is not None else ""
            raise APIError(401, f"The API key {shown}that made this batch has been revoked.",
                           code="invalid_api_key")
        run.key_name = info.name
        caller = Caller(info.name, info.owner, bulk=True, key=info)
        run.reservation = await reserve_quota(self.state, caller, images, usd)

    async def _perform(self, item: _Claimed, before_send: BeforeSend, run: _Run
                       ) -> tuple[Served, int, str]:
        """Run one item; store its answer. Returns (served, images made, model asked)."""
        dispatcher = self.state.require_dispatcher()
        settings = self.settings
        body = item.body
        if item.url == CHAT:
            chat = ChatRequest.model_validate(body)
            job = await chat_job_from(chat, self.state)
            await self._check_owner(item, run, 0, dispatcher.cost_ceiling(job))
            outcome, served = await dispatcher.chat(job, ITEM_DEADLINE_S, bulk=True,
                                                    before_send=before_send)
            result = ChatResult(outcome.text, outcome.finish_reason, outcome.prompt_tokens,
                                outcome.completion_tokens)
            answer = completion_body(completion_id(), chat.model, result)
            await self._stored(self._finish, item.id, state=DONE, status_code=200,
                               response=answer, request_id="req_" + uuid.uuid4().hex)
            return served, 0, chat.model
        image_job: ImageJob
        if item.url == GENERATIONS:
            gen = ImageGenerationRequest.model_validate(body)
            image_job = to_image_job(gen, gen.model or "auto", settings.images)
        else:
            fields = dict(body)
            refs = _edit_refs(fields.pop("images", None), settings.media)
            edit = ImageEditRequest.model_validate(fields)
            # The intake the HTTP route uses: off the event loop, fitted, within the
            # pixel budget (a 429 intake_busy here is retried like a full queue).
            sources = await edit_sources(self.state, edit, [
                (ref, f"images[{i}]") for i, ref in enumerate(refs)])
            image_job = to_edit_job(edit, edit.model or "auto", settings.images, sources)
            gen = edit
        await self._check_owner(item, run, image_job.n, dispatcher.cost_ceiling(image_job))
        images, served = await dispatcher.images(image_job, ITEM_DEADLINE_S, bulk=True,
                                                 before_send=before_send)
        await self._stored(self._store_images, item.id, image_job, images)
        return served, len(images), gen.model or "auto"

    async def _account(self, item: _Claimed, run: _Run, served: Served | None, images: int,
                       status: int, started: float, model: str) -> None:
        """One ledger row per finished item, as the HTTP endpoint would write, and its
        quota counted as used."""
        ok = served is not None
        await settle_quota(self.state, run.reservation, images if ok else 0,
                           served.cost_usd if served else 0.0)
        dispatcher = self.state.dispatcher
        if dispatcher is None:
            return
        row = UsageRow(
            endpoint=item.url, model=model, route=served.route if served else "none",
            upstream_model=served.upstream_model if served else None,
            outcome="ok" if ok else ("rejected" if status in (400, 404, 413, 429) else "error"),
            status=status, images=images if ok else 0,
            prompt_tokens=served.prompt_tokens if served else 0,
            completion_tokens=served.completion_tokens if served else 0,
            device_seconds=served.device_s if served else 0.0,
            cost_usd=served.cost_usd if served else 0.0,
            cloud_equivalent_usd=served.cloud_equivalent_usd if served else 0.0,
            latency_ms=(time.monotonic() - started) * 1000,
            queue_ms=served.queue_ms if served else 0.0,
            request_id=f"{item.batch_id}/{item.custom_id}"[:128], key_name=run.key_name,
            key_id=item.owner,
            reason=f"batch:{served.reason}" if served else "batch")
        try:
            await dispatcher.record(row)
        except Exception:
            log.exception("could not write the ledger row of a batch item")

    # -- advancing and finalizing batches ----------------------------------------------------

    def _advance(self) -> list[tuple[str, str]]:
        """Cancel and expire what is pending; return batches ready to finalize and how."""
        now = time.time()
        todo: list[tuple[str, str]] = []
        with self._write() as s:
            batches = list(s.scalars(select(BatchRow).where(BatchRow.status.in_(OPEN),
                                                            BatchRow.validated.is_(True))))
            if not batches:
                return todo
            for b in batches:
                if b.status == CANCELLING:
                    self._cancel_pending(s, b.id, "batch_cancelled",
                                         "The batch was cancelled before this request ran.")
                elif b.status == IN_PROGRESS and now >= b.expires_at:
                    self._cancel_pending(s, b.id, "batch_expired", "The batch expired (its "
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

    def _finalize(self, batch_id: str, final: str) -> None:
        """Write the output and error files (input line order) and close the batch."""
        out_id = _result_file_id(batch_id, "output")
        err_id = _result_file_id(batch_id, "error")
        out_tmp = self.files_dir / f".{out_id}.partial"
        err_tmp = self.files_dir / f".{err_id}.partial"
        n_out = n_err = 0
        out_bytes = err_bytes = 0
        with self._read() as s:
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
                os.replace(tmp, self.file_path(file_id))
                kept.append(FileRow(id=file_id, purpose="batch_output",
                                    filename=f"{batch_id}_{kind}.jsonl", size=size,
                                    created_at=now))
            else:
                tmp.unlink(missing_ok=True)
        _fsync_dir(self.files_dir)
        with self._write() as s:
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
            self._reclaim()
        except Exception as exc:  # space is given back at the next batch instead
            log.warning("batch worker: could not reclaim database space: %s", exc)

    def _reclaim(self) -> None:
        """Give back to the disk the pages the batch's answers took (they are in its output
        file now), so the database shrinks instead of only growing. A database made before
        auto_vacuum was set is converted by one VACUUM, once its free pages are worth it."""
        if self.engine.dialect.name != "sqlite" or self._memory:
            return
        with self._lock, self.engine.connect() as conn:
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

    # -- reading files ----------------------------------------------------------------------

    def open_content(self, file_id: str, caller: Caller) -> tuple[Path, FileRow]:
        row = self.get_file(file_id, caller)
        return self.file_path(file_id), row


def _edit_refs(raw: Any, settings: MediaSettings) -> list[str]:
    """``images: [{"image_url": "data:… | https://…"}]`` in a JSON edit body."""
    if not isinstance(raw, list) or not raw or not all(
            isinstance(r, dict) and isinstance(r.get("image_url"), str) for r in raw):
        raise bad_request("images must be a non-empty list of {\"image_url\": ...}.",
                          param="images")
    media.check_count(len(raw), settings, param="images")
    return [str(r["image_url"]) for r in raw]


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

