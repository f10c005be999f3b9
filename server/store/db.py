"""The database's schema, brought up to date by alembic migrations (server/migrations).

Every part that opens the database (the ledger, the keys, the batch jobs) calls
``upgrade`` first: when the schema is current that is one small query; otherwise the
migrations run, one process at a time. SQLite serializes them with ``BEGIN IMMEDIATE``
(which also makes its DDL transactional: a crash mid-way leaves the old schema, not half
of the new one), PostgreSQL with a transaction-scoped advisory lock; the second process
waits, then finds the work done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK = 0x5350_4C57  # "SPLW": the advisory lock id migrations hold on PostgreSQL


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def current(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated, or empty)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision; safe with several processes at once."""
    target = head()
    if current(engine) == target:
        return
    with _serialized(engine) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        if before == target:
            return
        command.upgrade(_config(conn), "head")
    log.info("database schema upgraded from %s to %s", before or "none", target)


def is_memory_sqlite(url: str) -> bool:
    u = make_url(url)
    db = u.database or ""
    return u.get_backend_name() == "sqlite" and (
        db in ("", ":memory:") or db.startswith("file::memory:")
        or u.query.get("mode") == "memory")


def open_engine(url: str, synchronous: str = "NORMAL") -> Engine:
    """An engine for any SQLAlchemy URL. SQLite gets its folder made, WAL, a busy timeout
    and, in memory, one shared connection (so every session sees the same database)."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True)
    memory = is_memory_sqlite(url)
    if not memory:
        Path(u.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if memory:
        kwargs["poolclass"] = StaticPool
    engine = create_engine(u, **kwargs)

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        try:
            if not memory:
                # A new database gives freed pages back to the disk on request (batch
                # images move out of it into output files); an old one is converted
                # once by BatchService's reclaim. Must precede the first table.
                cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA busy_timeout=10000")
        finally:
            cur.close()

    event.listen(engine, "connect", pragmas)
    return engine


@contextmanager
def _serialized(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that no other process's migration shares."""
    name = engine.dialect.name
    if name == "sqlite" and not is_memory_sqlite(engine.url.render_as_string(False)):
        # Our own engine: pysqlite would otherwise commit before each DDL statement, and
        # the app's engine must keep its usual transaction handling.
        own = create_engine(engine.url, connect_args={"timeout": 60})

        @event.listens_for(own, "connect")
        def _no_implicit(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we say BEGIN ourselves

        @event.listens_for(own, "begin")
        def _immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock, before reading

        try:
            with own.begin() as conn:
                yield conn
        finally:
            own.dispose()
        return
    with engine.begin() as conn:
        if name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK})
        yield conn
