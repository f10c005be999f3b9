"""The usage ledger: one row per request, in any SQLAlchemy database (SQLite by default).

Daily budgets are read back from here rather than kept in memory, so a restart does not
hand out a fresh day's allowance. Writes are small and synchronous; the server calls
``record`` from a worker thread or directly.

Times are stored as naive UTC (``UTCDateTime``) so that comparisons and ``date()`` mean the
same thing on every backend; what comes back out is always timezone-aware UTC.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    SQLColumnExpression,
    String,
    case,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.sql import Select
from sqlalchemy.types import TypeDecorator

from server.store import db
from server.store.db import is_memory_sqlite, open_engine

Q = TypeVar("Q", bound="Select[*tuple[Any, ...]]")  # any SELECT, its columns kept
log = logging.getLogger(__name__)
LOCAL_ROUTE = "local"
# Rows held in memory while the database refuses writes (a full disk): about 1 KB each.
MAX_HELD = 100_000
GROUPS = ("route", "model", "day", "endpoint", "key")


def _utc(at: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, accepts aware or (UTC) naive values."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else _utc(value)


@dataclass(frozen=True)
class UsageRow:
    """What the server records, one per request."""

    endpoint: str  # "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
    model: str  # what the client asked for
    route: str  # "local" | "openai" | "gemini"
    upstream_model: str | None
    outcome: str  # "ok" | "error" | "rejected"
    status: int  # HTTP status returned to the client
    images: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    device_seconds: float = 0.0
    cost_usd: float = 0.0  # what this request cost where it ran (0 for failed upstream calls)
    cloud_equivalent_usd: float = 0.0  # the same work on the default cloud provider
    latency_ms: float = 0.0
    queue_ms: float = 0.0
    request_id: str | None = None
    key_name: str | None = None  # shown in group_by=key; never used to tell keys apart
    key_id: str | None = None  # the owner id (server/store/keys.py owner_id): quotas and filters
    reason: str | None = None  # "explicit", "quality", "deadline", "failover", ...
    at: datetime | None = None  # default: now (UTC)


@dataclass(frozen=True)
class MinuteBucket:
    """Sums over one UTC minute and one route (``Ledger.per_minute``)."""

    minute: datetime  # aware UTC, seconds zeroed
    route: str
    requests: int
    images: int
    cost_usd: float
    cloud_equivalent_usd: float
    latency_ms: float  # summed: divide by requests for the mean
    errors: int  # requests whose outcome was not "ok"


# A row's fields are the record's columns, by name (the record adds its id).
_ROW_FIELDS = tuple(f.name for f in fields(UsageRow))


class Base(DeclarativeBase):
    pass


class UsageRecord(Base):
    __tablename__ = "usage"
    __table_args__ = (
        Index("ix_usage_at", "at"),
        Index("ix_usage_route_at", "route", "at"),
        Index("ix_usage_key_at", "key_id", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(32))
    upstream_model: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))
    status: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    device_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    cost_usd: Mapped[float] = mapped_column(Float, default=0.0)
    cloud_equivalent_usd: Mapped[float] = mapped_column(Float, default=0.0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    queue_ms: Mapped[float] = mapped_column(Float, default=0.0)
    request_id: Mapped[str | None] = mapped_column(String(128))
    key_name: Mapped[str | None] = mapped_column(String(255))
    key_id: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str | None] = mapped_column(String(255))


def _values(row: UsageRow) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in _ROW_FIELDS}
    values["at"] = _utc(row.at) if row.at is not None else datetime.now(UTC)
    return values


def _day_bounds(now: datetime | None) -> tuple[datetime, datetime]:
    """[UTC midnight of ``now``, the next UTC midnight)."""
    day = _utc(now or datetime.now(UTC)).replace(hour=0, minute=0, second=0, microsecond=0)
    return day, day + timedelta(days=1)


def _minute_of(at: Any, dialect: str) -> ColumnElement[str]:
    """The UTC minute of a stored time, as text "YYYY-MM-DD HH:MM", in the backend's SQL
    (times are stored naive UTC, so no zone conversion happens here)."""
    if dialect == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M", at, type_=String)
    if dialect == "postgresql":
        return func.to_char(func.date_trunc("minute", at), "YYYY-MM-DD HH24:MI", type_=String)
    if dialect in ("mysql", "mariadb"):
        return func.date_format(at, "%Y-%m-%d %H:%i", type_=String)
    raise ValueError(f"per-minute usage is not implemented for the {dialect!r} backend; "
                     "use SQLite, PostgreSQL or MySQL")


def _parse_minute(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


class Ledger:
    def __init__(self, url: str) -> None:
        self.url = make_url(url).render_as_string(hide_password=True)
        self._memory = is_memory_sqlite(url)
        # One in-process writer at a time: SQLite would serialize them anyway (busy_timeout),
        # and the in-memory database is one shared connection, which must not interleave.
        self._write_lock = threading.Lock()
        self.engine: Engine = open_engine(url)
        db.upgrade(self.engine)
        self._held: deque[UsageRow] = deque()
        self._held_lock = threading.Lock()
        self.dropped = 0  # held rows given up (beyond MAX_HELD): logged, counted
        self.write_error: str | None = None  # the last write's failure, until one succeeds

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads; on the in-memory database (one shared connection) it
        takes the writers' turn (the key store and the quotas share both)."""
        if self._memory:
            with self._write_lock, Session(self.engine) as s:
                yield s
        else:
            with Session(self.engine) as s:
                yield s

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A session in a transaction, one writer at a time in this process (the quota
        counters share the ledger's database and its lock)."""
        with self._write_lock, Session(self.engine) as s, s.begin():
            yield s

    # -- writes ---------------------------------------------------------------------------

    def record(self, row: UsageRow) -> int:
        """Store one request; returns its id."""
        rec = UsageRecord(**_values(row))
        with self._write_lock, Session(self.engine) as s, s.begin():
            s.add(rec)
            s.flush()
            return rec.id

    def record_many(self, rows: Sequence[UsageRow]) -> None:
        """Store rows in one transaction (one executemany): all or none."""
        if not rows:
            return
        with self._write_lock, Session(self.engine) as s, s.begin():
            s.execute(insert(UsageRecord), [_values(r) for r in rows])

    def record_or_hold_many(self, rows: Sequence[UsageRow]) -> bool:
        """Write the rows in one transaction; when the database refuses (a full disk),
        hold them to write later (``flush_held``) rather than fail the requests they
        account for: finished work is delivered whether or not its bookkeeping could be
        written at once."""
        if self._held:
            self.flush_held()
        try:
            self.record_many(rows)
        except Exception as exc:
            now = datetime.now(UTC)
            self._hold([replace(row, at=row.at or now) for row in rows], exc)
            return False
        self.write_error = None
        return True

    def flush_held(self) -> int:
        """Write held rows, oldest first, until one fails; returns how many remain."""
        with self._held_lock:
            while self._held:
                try:
                    self.record(self._held[0])
                except Exception as exc:
                    self.write_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                    break
                self._held.popleft()
            else:
                self.write_error = None
            return len(self._held)

    @property
    def held(self) -> int:
        return len(self._held)

    def _hold(self, rows: Sequence[UsageRow], exc: Exception) -> None:
        with self._held_lock:
            for row in rows:
                if len(self._held) >= MAX_HELD:
                    self._held.popleft()
                    self.dropped += 1
                self._held.append(row)
            self.write_error = f"{type(exc).__name__}: {str(exc)[:200]}"
        log.error("ledger: could not write %d row(s) (%s); %d rows held to write later",
                  len(rows), self.write_error, len(self._held))

    # -- reads ----------------------------------------------------------------------------

    def spent_today_by_route(self, *, now: datetime | None = None) -> dict[str, float]:
        """USD spent per route (local included) during the UTC day of ``now``."""
        start, end = _day_bounds(now)
        q = (select(UsageRecord.route, func.sum(UsageRecord.cost_usd))
             .where(UsageRecord.at >= start, UsageRecord.at < end)
             .group_by(UsageRecord.route))
        with self.reading() as s:
            return {r: float(v or 0.0) for r, v in s.execute(q).all()}

    def used_today(self, owner: str, *, now: datetime | None = None) -> tuple[int, float]:
        """(images, USD) this owner (a key's owner id) has used since UTC midnight."""
        start, end = _day_bounds(now)
        q = select(func.sum(UsageRecord.images), func.sum(UsageRecord.cost_usd)).where(
            UsageRecord.key_id == owner, UsageRecord.at >= start, UsageRecord.at < end)
        with self.reading() as s:
            images, cost = s.execute(q).one()
        return int(images or 0), float(cost or 0.0)

    def totals(self, *, since: datetime | None = None, until: datetime | None = None,
               group_by: str = "route", only_key: str | None = None
               ) -> list[dict[str, Any]]:
        """Sums over [since, until), one dict per group, ordered by group.

        ``group_by``: "route", "model", "day" (UTC, "YYYY-MM-DD"), "endpoint" or "key"
        (the API key's name; None for unauthenticated requests). ``only_key`` is an owner
        id (server/store/keys.py ``owner_id``), as for ``per_minute``.
        """
        col: SQLColumnExpression[Any]
        if group_by == "route":
            col = UsageRecord.route
        elif group_by == "model":
            col = UsageRecord.model
        elif group_by == "endpoint":
            col = UsageRecord.endpoint
        elif group_by == "key":
            col = UsageRecord.key_name
        elif group_by == "day":
            col = func.date(UsageRecord.at)
        else:
            raise ValueError(f"group_by must be one of {', '.join(GROUPS)}, not {group_by!r}")
        g = col.label("grp")
        q = select(
            g,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.images),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.sum(UsageRecord.device_seconds),
            func.sum(UsageRecord.cost_usd),
            func.sum(UsageRecord.cloud_equivalent_usd),
        ).group_by(g).order_by(g)
        q = _within(q, since, until, only_key)
        with self.reading() as s:
            result = s.execute(q).all()
        out: list[dict[str, Any]] = []
        for grp, n, images, ptok, ctok, dev_s, cost, cloud in result:
            if isinstance(grp, date | datetime):  # backends whose date() returns a date
                grp = grp.strftime("%Y-%m-%d")
            cost_f, cloud_f = float(cost or 0.0), float(cloud or 0.0)
            out.append({
                "group": grp, "requests": int(n), "images": int(images or 0),
                "prompt_tokens": int(ptok or 0), "completion_tokens": int(ctok or 0),
                "device_seconds": float(dev_s or 0.0), "cost_usd": cost_f,
                "cloud_equivalent_usd": cloud_f, "savings_usd": cloud_f - cost_f,
            })
        return out

    def per_minute(self, since: datetime, *, until: datetime | None = None,
                   only_key: str | None = None, ids: tuple[int, int] | None = None
                   ) -> list[MinuteBucket]:
        """Per-minute, per-route sums over [since, until): one grouped query, ordered by
        minute then route. Minutes with no requests are absent; ``only_key`` keeps one
        API key's rows; ``ids=(after, upto)`` only rows with ``after < id <= upto``."""
        minute = _minute_of(UsageRecord.at, self.engine.dialect.name).label("minute")
        q = select(
            minute,
            UsageRecord.route,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.images),
            func.sum(UsageRecord.cost_usd),
            func.sum(UsageRecord.cloud_equivalent_usd),
            func.sum(UsageRecord.latency_ms),
            func.sum(case((UsageRecord.outcome == "ok", 0), else_=1)),
        ).group_by(minute, UsageRecord.route).order_by(minute, UsageRecord.route)
        q = _within(q, since, until, only_key)
        if ids is not None:
            q = q.where(UsageRecord.id > ids[0], UsageRecord.id <= ids[1])
        with self.reading() as s:
            result = s.execute(q).all()
        return [MinuteBucket(
                    minute=_parse_minute(m), route=route, requests=int(n),
                    images=int(images or 0), cost_usd=float(cost or 0.0),
                    cloud_equivalent_usd=float(cloud or 0.0),
                    latency_ms=float(latency or 0.0), errors=int(errors or 0))
                for m, route, n, images, cost, cloud, latency, errors in result]

    def last_id(self) -> int:
        """The newest row's id (0 when empty): rows are numbered in the order recorded."""
        with self.reading() as s:
            return int(s.execute(select(func.max(UsageRecord.id))).scalar() or 0)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _within(q: Q, since: datetime | None, until: datetime | None, only_key: str | None) -> Q:
    """Rows at or after ``since``, before ``until``, of one key: each only if given."""
    if since is not None:
        q = q.where(UsageRecord.at >= _utc(since))
    if until is not None:
        q = q.where(UsageRecord.at < _utc(until))
    if only_key is not None:
        q = q.where(UsageRecord.key_id == only_key)
    return q
