"""The Batch API's facade: what the routes and app.py call. It builds the parts (store,
files, lease, worker) on one shared ``Store`` and answers the batch endpoints itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from server.batches.files import MAX_FILE_BYTES, MAX_FILE_LINES, Files, visible
from server.batches.lease import Lease
from server.batches.store import (
    CANCELLED,
    CANCELLING,
    ENDPOINTS,
    IN_PROGRESS,
    VALIDATING,
    BatchRow,
    FileRow,
    Store,
    batch_object,
    cancel_pending,
    not_found,
    request_counts,
)
from server.batches.worker import CONCURRENCY, Worker
from server.config import Settings
from server.config_upstreams import TIERS_METADATA, parse_places
from server.errors import bad_request
from server.serving import Serving
from server.serving.accounting import Caller
from server.store.keys import KeyStore
from server.wire import safejson

COMPLETION_WINDOWS: Mapping[str, int] = {"24h": 24 * 3600}
MAX_METADATA_KEYS = 16


class BatchService:
    """Files, batches and the worker. Blocking methods (the DB, the disk) run in threads.
    The limits are read at each request: ``max_file_bytes`` and ``max_file_lines`` (on
    ``files``) per upload, ``completion_windows`` (name -> seconds) per batch."""

    def __init__(self, settings: Settings, serving: Serving, keys: KeyStore,
                 models_settled: Callable[[], bool], *, url: str | None = None,
                 files_dir: Path | None = None, concurrency: int = CONCURRENCY,
                 stop_wait_s: float | None = None, max_file_bytes: int = MAX_FILE_BYTES,
                 max_file_lines: int = MAX_FILE_LINES,
                 completion_windows: Mapping[str, int] | None = None) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.stop_wait_s = (min(self.settings.shutdown_grace_s, 60.0) if stop_wait_s is None
                            else stop_wait_s)
        self.completion_windows = dict(COMPLETION_WINDOWS if completion_windows is None
                                       else completion_windows)
        self.store = Store(url or self.settings.ledger_url, files_dir)
        self.engine: Engine = self.store.engine
        self.files_dir = self.store.files_dir
        self.files = Files(self.store, max_bytes=max_file_bytes, max_lines=max_file_lines)
        self.lease = Lease(self.store)
        self.worker = Worker(self.store, self.lease, serving, keys, models_settled,
                             concurrency=concurrency, stop_wait_s=self.stop_wait_s)
        self._beat_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.worker.start()
        self._beat_task = asyncio.create_task(self.lease.beat(), name="batch-lease")

    def wake(self) -> None:
        self.worker.wake()

    async def stop(self) -> None:
        """Let in-flight items finish (bounded); pending ones wait for the next start."""
        await self.worker.stop()
        if self._beat_task is not None:
            self._beat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat_task
        if self.lease.held:
            # What this process abandoned: re-run next time, or (sent upstream) unknown.
            await asyncio.to_thread(self.lease.reconcile, self.store.holder)
            await asyncio.to_thread(self.lease.release)
            self.lease.held = False
        self.store.close()

    # -- files ------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.store.file_path(file_id)

    def save_upload(self, src: IO[bytes], filename: str, purpose: str, owner: str | None
                    ) -> dict[str, Any]:
        return self.files.save_upload(src, filename, purpose, owner)

    def get_file(self, file_id: str, caller: Caller, param: str = "file_id") -> FileRow:
        return self.files.get_file(file_id, caller, param)

    def delete_file(self, file_id: str, caller: Caller) -> dict[str, Any]:
        return self.files.delete_file(file_id, caller)

    def list_files(self, caller: Caller, **query: Any) -> dict[str, Any]:
        return self.files.list_files(caller, **query)

    def open_content(self, file_id: str, caller: Caller) -> tuple[Path, FileRow]:
        return self.files.open_content(file_id, caller)

    # -- batches: the API -------------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, window: str,
                     metadata: dict[str, str] | None, caller: Caller) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise bad_request(f"Unsupported endpoint {endpoint[:80]!r}: this server runs "
                              f"batches for {', '.join(ENDPOINTS)}.", param="endpoint",
                              code="unsupported_value")
        if window not in self.completion_windows:
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
        if metadata and TIERS_METADATA in metadata:
            try:
                parse_places(metadata[TIERS_METADATA])
            except ValueError as exc:
                raise bad_request(f"metadata: {exc}.", param="metadata") from None
        file = self.get_file(input_file_id, caller, "input_file_id")
        if file.purpose != "batch":
            raise bad_request(f"The file {input_file_id!r} has purpose {file.purpose!r}; a "
                              "batch needs a file uploaded with purpose 'batch'.",
                              param="input_file_id")
        now = int(time.time())
        row = BatchRow(id="batch_" + uuid.uuid4().hex, endpoint=endpoint,
                       input_file_id=input_file_id, completion_window=window,
                       status=VALIDATING, validated=False, created_at=now,
                       expires_at=now + self.completion_windows[window], meta=metadata,
                       owner=caller.owner)
        with self.store.write() as s:
            s.add(row)
            s.commit()
        return batch_object(row, {"total": 0, "completed": 0, "failed": 0})

    def _get_batch(self, s: Session, batch_id: str, caller: Caller) -> BatchRow:
        row = s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
        if row is None or not visible(row.owner, caller):
            raise not_found("batch", batch_id, "batch_id")
        return row

    def get_batch(self, batch_id: str, caller: Caller) -> dict[str, Any]:
        with self.store.read() as s:
            row = self._get_batch(s, batch_id, caller)
            return batch_object(row, request_counts(s, [row.id])[row.id])

    def list_batches(self, after: str | None, limit: int, caller: Caller) -> dict[str, Any]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        with self.store.read() as s:
            q = select(BatchRow).order_by(BatchRow.seq.desc()).limit(limit + 1)
            if not caller.admin:
                q = q.where(BatchRow.owner.is_(None) if caller.owner is None
                            else BatchRow.owner == caller.owner)
            if after:
                cursor = s.scalar(select(BatchRow.seq).where(BatchRow.id == after))
                if cursor is None:
                    raise not_found("batch", after, "after")
                q = q.where(BatchRow.seq < cursor)
            rows = list(s.scalars(q))
            more = len(rows) > limit
            rows = rows[:limit]
            counts = request_counts(s, [r.id for r in rows])
            data = [batch_object(r, counts[r.id]) for r in rows]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    def cancel_batch(self, batch_id: str, caller: Caller) -> dict[str, Any]:
        now = int(time.time())
        with self.store.write() as s:
            row = self._get_batch(s, batch_id, caller)
            if row.status in (VALIDATING, IN_PROGRESS):
                row.status, row.cancelling_at = CANCELLING, now
                cancel_pending(s, row.id, "batch_cancelled",
                               "The batch was cancelled before this request ran.")
                s.commit()
            elif row.status not in (CANCELLING, CANCELLED):
                # 400, not OpenAI's 409: the SDK would retry a 409.
                raise bad_request(f"The batch is {row.status}; only a validating or "
                                  "in-progress batch can be cancelled.", param="batch_id",
                                  code="batch_not_cancellable")
            result = batch_object(row, request_counts(s, [row.id])[row.id])
        return result
