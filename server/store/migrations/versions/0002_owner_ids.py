"""Owners are stable ids, never names.

Files, batches and usage rows named their owner by the API key's *name*, so a team key
created with the name ``admin`` read the admin's files and usage. From here on an owner
is ``"admin"`` (the admin key), ``"key:<api_keys.id>"`` (a team key) or NULL (an open
server). Old rows are mapped by name; a name that matches no key becomes ``"gone"``
(visible to the admin only). A team key that was named ``admin`` is renamed
``admin-key-<id>``: rows owned by "admin" are ambiguous, and go to the admin, so that
key loses access to them rather than keeping the admin's.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ADMIN, GONE = "admin", "gone"


def _remap(table: str, column: str, mapping: dict[str, str], target: str | None = None
           ) -> None:
    """One UPDATE with a CASE, so a name that looks like an id ("key:3") is never mapped
    twice, as a chain of single updates could."""
    t = sa.table(table, sa.column(column), *([sa.column(target)] if target else []))
    src = t.c[column]
    new = sa.case(mapping, value=src, else_=sa.literal(GONE)) if mapping else sa.literal(GONE)
    op.execute(t.update().where(src.is_not(None)).values({target or column: new}))


def upgrade() -> None:
    bind = op.get_bind()
    keys = sa.table("api_keys", sa.column("id", sa.Integer), sa.column("name", sa.String))
    for key_id, name in bind.execute(sa.select(keys.c.id, keys.c.name)).all():
        if name.lower() == ADMIN:
            op.execute(keys.update().where(keys.c.id == key_id)
                       .values(name=f"admin-key-{key_id}"))
    mapping = {name: f"key:{key_id}"
               for key_id, name in bind.execute(sa.select(keys.c.id, keys.c.name)).all()}
    mapping[ADMIN] = ADMIN
    _remap("files", "owner", mapping)
    _remap("batches", "owner", mapping)
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("key_id", sa.String(40)))
    _remap("usage", "key_name", mapping, target="key_id")
    op.create_index("ix_usage_key_at", "usage", ["key_id", "at"])


def downgrade() -> None:
    op.drop_index("ix_usage_key_at", "usage")
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("key_id")
