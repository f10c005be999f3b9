"""The Files API's side of the Batch API: uploads to disk, reading, deleting, who sees what.

An upload is copied under a temporary name, counted against the limits as it goes,
fsynced and renamed before its row is committed, so a row always points at a whole file.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any

from sqlalchemy import and_, delete, or_, select

from server.batches.store import OPEN, BatchRow, FileRow, Store, file_object, fsync_dir, not_found
from server.errors import APIError, bad_request
from server.serving.accounting import Caller
from server.wire import safejson

# Upload limits: the defaults of BatchService's parameters. The middleware lets a
# POST /v1/files body this much larger than MAX_FILE_BYTES through for multipart framing.
MAX_FILE_BYTES = 200 * 2**20
MAX_FILE_LINES = 50_000
UPLOAD_SLACK_BYTES = 16 * 2**20


def visible(owner: str | None, caller: Caller) -> bool:
    return caller.admin or owner == caller.owner


class Files:
    """Batch input files and the output/error files a batch leaves. ``max_bytes`` and
    ``max_lines`` are read at each upload."""

    def __init__(self, store: Store, *, max_bytes: int = MAX_FILE_BYTES,
                 max_lines: int = MAX_FILE_LINES) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.max_lines = max_lines

    def save_upload(self, src: IO[bytes], filename: str, purpose: str, owner: str | None
                    ) -> dict[str, Any]:
        """Copy an upload to disk, counting bytes and lines against the limits."""
        max_bytes, max_lines = self.max_bytes, self.max_lines
        file_id = "file-" + uuid.uuid4().hex[:24]
        tmp = self.store.files_dir / f".{file_id}.partial"
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
            os.replace(tmp, self.store.file_path(file_id))
            fsync_dir(self.store.files_dir)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        name = os.path.basename(filename.replace("\\", "/"))[:255]
        name = name if safejson.valid_text(name) and name.isprintable() else ""
        name = name or "upload.jsonl"
        row = FileRow(id=file_id, purpose=purpose, filename=name, size=size,
                      created_at=int(time.time()), owner=owner)
        with self.store.write() as s:
            s.add(row)
            s.commit()
        return file_object(row)

    def get_file(self, file_id: str, caller: Caller, param: str = "file_id") -> FileRow:
        with self.store.read() as s:
            row = s.get(FileRow, file_id)
        if row is None or not visible(row.owner, caller) or \
                not self.store.file_path(file_id).is_file():
            raise not_found("file", file_id, param)
        return row

    def delete_file(self, file_id: str, caller: Caller) -> dict[str, Any]:
        with self.store.read() as s:
            row = s.get(FileRow, file_id)
            if row is None or not visible(row.owner, caller):
                raise not_found("file", file_id, "file_id")
            if s.scalar(select(BatchRow.id).where(BatchRow.input_file_id == file_id,
                                                  BatchRow.status.in_(OPEN)).limit(1)):
                raise bad_request(f"The file {file_id!r} is the input of a batch that is "
                                  "still running.", param="file_id", code="file_in_use")
        # The bytes first: on a full disk, deleting files is how space comes back, and
        # deleting the row needs room itself (SQLite writes its journal first). A row left
        # behind points at nothing, and get_file answers 404 for it.
        self.store.file_path(file_id).unlink(missing_ok=True)
        fsync_dir(self.store.files_dir)
        with self.store.write() as s:
            s.execute(delete(FileRow).where(FileRow.id == file_id))
            s.commit()
        return {"id": file_id, "object": "file", "deleted": True}

    def list_files(self, caller: Caller, *, purpose: str | None = None, limit: int = 10_000,
                   after: str | None = None, order: str = "desc") -> dict[str, Any]:
        """The caller's files (an admin's: all), newest first unless ``order`` is asc;
        ``after``: the id of the last file of the previous page. Rows whose bytes are gone
        (a delete cut short by a full disk) are not listed, as ``get_file`` finds none."""
        newest_first = order == "desc"
        with self.store.read() as s:
            key = (FileRow.created_at.desc(), FileRow.id.desc()) if newest_first else (
                FileRow.created_at.asc(), FileRow.id.asc())
            q = select(FileRow).order_by(*key)
            if not caller.admin:
                q = q.where(FileRow.owner.is_(None) if caller.owner is None
                            else FileRow.owner == caller.owner)
            if purpose is not None:
                q = q.where(FileRow.purpose == purpose)
            if after:
                cursor = s.get(FileRow, after)
                if cursor is None or not visible(cursor.owner, caller):
                    raise not_found("file", after, "after")
                at, fid = cursor.created_at, cursor.id
                q = q.where(or_(FileRow.created_at < at,
                                and_(FileRow.created_at == at, FileRow.id < fid))
                            if newest_first else
                            or_(FileRow.created_at > at,
                                and_(FileRow.created_at == at, FileRow.id > fid)))
            rows = [r for r in s.scalars(q.limit(limit + 1))]
        more = len(rows) > limit
        data = [file_object(r) for r in rows[:limit] if self.store.file_path(r.id).is_file()]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    def open_content(self, file_id: str, caller: Caller) -> tuple[Path, FileRow]:
        row = self.get_file(file_id, caller)
        return self.store.file_path(file_id), row
