"""API keys: stored hashed in the ledger's database, with daily quotas and a priority.

A key is shown once, at creation. The server is open (a single-user box) only while no
key of any kind exists: no admin key configured and no team key ever created. Revoking
the last team key does not open it again.

Identity is never a name a user chose: what a key owns (files, batches, usage, quota) is
recorded under its owner id, ``key:<id>`` (the row's id, never reused), and the admin
key's under ``admin``; the name ``admin`` is reserved.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import DateTime, Float, Integer, String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from server.store.ledger import Ledger

Priority = Literal["interactive", "bulk"]
PREFIX = "sk-spw-"
ADMIN_OWNER = "admin"  # the owner id (and the shown name) of the admin key
RESERVED_NAMES = frozenset({"admin"})


def owner_id(key_id: int) -> str:
    return f"key:{key_id}"


class _Base(DeclarativeBase):
    pass


class KeyRecord(_Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    shown: Mapped[str] = mapped_column(String(20))  # first characters, for listings
    daily_images: Mapped[int | None] = mapped_column(Integer, nullable=True)
    daily_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    priority: Mapped[str] = mapped_column(String(20), default="interactive")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    shown: str
    daily_images: int | None
    daily_usd: float | None
    priority: Priority
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @property
    def owner(self) -> str:
        return owner_id(self.id)


def digest(key: str) -> str:
    # Keys are 256 random bits: a plain SHA-256 is enough (no dictionary to guess from).
    return hashlib.sha256(key.encode()).hexdigest()


def _info(r: KeyRecord) -> KeyInfo:
    return KeyInfo(r.id, r.name, r.shown, r.daily_images, r.daily_usd,
                   "bulk" if r.priority == "bulk" else "interactive", r.created_at,
                   r.revoked_at)


class KeyStore:
    """Reads are cached for ``ttl_s`` so a key made or revoked by `spillway keys` in
    another process takes effect within seconds, without a query per request."""

    def __init__(self, ledger: Ledger, ttl_s: float = 2.0) -> None:
        self.ledger = ledger  # the ledger brought its schema up to date; its sessions take
        # turns on the in-memory database's one connection
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[str, KeyInfo] = {}  # digest -> an active key
        self._by_id: dict[int, KeyInfo] = {}  # every key, revoked ones too
        self._loaded = 0.0

    def create(self, name: str, *, daily_images: int | None = None,
               daily_usd: float | None = None, priority: Priority = "interactive") -> str:
        if not name or len(name) > 100 or not name.isprintable() or name != name.strip():
            raise ValueError("a key needs a name of 1..100 printable characters, without "
                             "spaces at either end")
        if name.lower() in RESERVED_NAMES:
            raise ValueError(f"the name {name!r} is reserved (it is the admin key's)")
        key = PREFIX + secrets.token_urlsafe(32)
        with self.ledger.writing() as s:
            if s.scalar(select(KeyRecord).where(KeyRecord.name == name)) is not None:
                raise ValueError(f"a key named {name!r} exists already")
            s.add(KeyRecord(name=name, digest=digest(key), shown=key[:12] + "…",
                            daily_images=daily_images, daily_usd=daily_usd,
                            priority=priority, created_at=datetime.now(UTC)))
        self._loaded = 0.0
        return key

    def revoke(self, name: str) -> bool:
        with self.ledger.writing() as s:
            rec = s.scalar(select(KeyRecord).where(KeyRecord.name == name))
            if rec is None or rec.revoked_at is not None:
                return False
            rec.revoked_at = datetime.now(UTC)
        self._loaded = 0.0
        return True

    def list(self) -> list[KeyInfo]:
        with self.ledger.reading() as s:
            return [_info(r) for r in s.scalars(select(KeyRecord).order_by(KeyRecord.id))]

    def refresh(self) -> None:
        """Reload when half the cache's life is gone: called off the request path (the
        app's key-refresh task), so that requests find it fresh and need no thread."""
        self._refresh(self.ttl_s / 2)

    def _refresh(self, max_age_s: float | None = None) -> None:
        with self._lock:
            if time.monotonic() - self._loaded > (self.ttl_s if max_age_s is None
                                                  else max_age_s):
                with self.ledger.reading() as s:
                    rows = list(s.scalars(select(KeyRecord)))
                self._cache = {r.digest: _info(r) for r in rows if r.revoked_at is None}
                self._by_id = {r.id: _info(r) for r in rows}
                self._loaded = time.monotonic()

    def fresh(self) -> bool:
        """The cache may answer now: ``cached_*`` then need no query (nor a thread)."""
        return time.monotonic() - self._loaded <= self.ttl_s

    def cached_any_keys(self) -> bool:
        return bool(self._by_id)

    def cached_lookup(self, key: str) -> KeyInfo | None:
        return self._cache.get(digest(key))

    def any_keys(self) -> bool:
        """True once any team key was ever made, revoked ones included."""
        self._refresh()
        return bool(self._by_id)

    def lookup(self, key: str) -> KeyInfo | None:
        self._refresh()
        return self._cache.get(digest(key))

    def by_owner(self, owner: str) -> KeyInfo | None:
        """The team key (active or revoked) that an owner id names."""
        prefix, _, number = owner.partition(":")
        if prefix != "key" or not number.isdigit():
            return None
        self._refresh()
        return self._by_id.get(int(number))
