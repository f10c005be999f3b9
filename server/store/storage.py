"""When the disk fills: telling storage trouble apart, and what a client hears.

A full disk is transient (an operator frees space) and must never be mistaken for the
request's fault or turned into lost work: a request that needs to store something gets
507 ``insufficient_storage`` (server/errors.py); finished work that could not be written
down is held and written later (server/store/ledger.py, server/batches/); ``/readyz`` says so.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from sqlalchemy.exc import OperationalError

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What SQLite (and PostgreSQL) say when a write finds no room.
_FULL_TEXTS = ("database or disk is full", "disk i/o error", "no space left on device",
               "could not extend file", "disk quota exceeded")


def is_storage_full(exc: BaseException) -> bool:
    """Is this error (or what caused it) the disk or database being out of room?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if isinstance(current, OperationalError) and any(
                text in str(current.orig).lower() for text in _FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def is_transient_storage(exc: BaseException) -> bool:
    """Storage errors worth retrying: a full disk, a locked or unreachable database."""
    return is_storage_full(exc) or isinstance(exc, OperationalError)


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None
