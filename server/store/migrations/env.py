"""Alembic's environment for Spillway: always run from ``server.store.db.upgrade``, which hands
over an open connection (inside the transaction that serializes migrations)."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
# render_as_batch: SQLite cannot ALTER most things; batch mode copies the table instead.
context.configure(connection=connection, target_metadata=None, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
