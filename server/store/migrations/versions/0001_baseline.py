"""Baseline: the schema the server had before migrations (ledger, keys, batch jobs).

Databases made before migrations existed have some or all of these tables and no
``alembic_version``: each table is created only when it is missing, so an existing
database is adopted as it is, never recreated.

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> dict[str, tuple[list[sa.schema.SchemaItem], list[tuple[str, list[str], bool]]]]:
    """Table name -> (columns and constraints, [(index name, columns, unique)])."""
    return {
        "usage": ([
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("at", sa.DateTime(), nullable=False),
            sa.Column("endpoint", sa.String(64), nullable=False),
            sa.Column("model", sa.String(255), nullable=False),
            sa.Column("route", sa.String(32), nullable=False),
            sa.Column("upstream_model", sa.String(255)),
            sa.Column("outcome", sa.String(16), nullable=False),
            sa.Column("status", sa.Integer(), nullable=False),
            sa.Column("images", sa.Integer(), nullable=False),
            sa.Column("prompt_tokens", sa.Integer(), nullable=False),
            sa.Column("completion_tokens", sa.Integer(), nullable=False),
            sa.Column("device_seconds", sa.Float(), nullable=False),
            sa.Column("cost_usd", sa.Float(), nullable=False),
            sa.Column("cloud_equivalent_usd", sa.Float(), nullable=False),
            sa.Column("latency_ms", sa.Float(), nullable=False),
            sa.Column("queue_ms", sa.Float(), nullable=False),
            sa.Column("request_id", sa.String(128)),
            sa.Column("key_name", sa.String(255)),
            sa.Column("reason", sa.String(255)),
        ], [("ix_usage_at", ["at"], False), ("ix_usage_route_at", ["route", "at"], False)]),
        "api_keys": ([
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("name", sa.String(100), nullable=False, unique=True),
            sa.Column("digest", sa.String(64), nullable=False),
            sa.Column("shown", sa.String(20), nullable=False),
            sa.Column("daily_images", sa.Integer()),
            sa.Column("daily_usd", sa.Float()),
            sa.Column("priority", sa.String(20), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("revoked_at", sa.DateTime()),
        ], [("ix_api_keys_digest", ["digest"], True)]),
        "files": ([
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("purpose", sa.String(32), nullable=False),
            sa.Column("filename", sa.String(255), nullable=False),
            sa.Column("bytes", sa.Integer(), nullable=False),
            sa.Column("created_at", sa.Integer(), nullable=False),
            sa.Column("owner", sa.String(100)),
        ], []),
        "batches": ([
            sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("id", sa.String(64), nullable=False, unique=True),
            sa.Column("endpoint", sa.String(64), nullable=False),
            sa.Column("input_file_id", sa.String(64), nullable=False),
            sa.Column("completion_window", sa.String(16), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("validated", sa.Boolean(), nullable=False),
            sa.Column("created_at", sa.Integer(), nullable=False),
            sa.Column("expires_at", sa.Integer(), nullable=False),
            *(sa.Column(f"{stamp}_at", sa.Integer()) for stamp in (
                "in_progress", "finalizing", "completed", "cancelling", "cancelled",
                "failed", "expired")),
            sa.Column("output_file_id", sa.String(64)),
            sa.Column("error_file_id", sa.String(64)),
            sa.Column("metadata", sa.JSON()),
            sa.Column("errors", sa.JSON()),
            sa.Column("owner", sa.String(100)),
        ], [("ix_batches_status", ["status"], False)]),
        "batch_items": ([
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("batch_id", sa.String(64), nullable=False),
            sa.Column("line", sa.Integer(), nullable=False),
            sa.Column("line_id", sa.String(64), nullable=False),
            sa.Column("custom_id", sa.String(512), nullable=False),
            sa.Column("method", sa.String(8), nullable=False),
            sa.Column("url", sa.String(64), nullable=False),
            sa.Column("body", sa.JSON(), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("not_before", sa.Float(), nullable=False),
            sa.Column("claim", sa.String(128)),
            sa.Column("upstream_provider", sa.String(32)),
            sa.Column("upstream_model", sa.String(255)),
            sa.Column("sent_at", sa.Float()),
            sa.Column("status_code", sa.Integer()),
            sa.Column("request_id", sa.String(64)),
            sa.Column("response", sa.JSON()),
            sa.Column("error", sa.JSON()),
            sa.Column("error_code", sa.String(64)),
            sa.Column("finished_at", sa.Float()),
            sa.UniqueConstraint("batch_id", "custom_id", name="uq_batch_items_custom_id"),
        ], [("ix_batch_items_state", ["batch_id", "state", "line"], False),
            ("ix_batch_items_line", ["batch_id", "line"], False)]),
        "batch_rejects": ([
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("batch_id", sa.String(64), nullable=False),
            sa.Column("line", sa.Integer(), nullable=False),
            sa.Column("line_id", sa.String(64), nullable=False),
            sa.Column("custom_id", sa.String(512)),
            sa.Column("code", sa.String(64), nullable=False),
            sa.Column("message", sa.String(2000), nullable=False),
        ], [("ix_batch_rejects_line", ["batch_id", "line"], False)]),
        "batch_worker_lease": ([
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("holder", sa.String(128), nullable=False),
            sa.Column("host", sa.String(255), nullable=False),
            sa.Column("pid", sa.Integer(), nullable=False),
            sa.Column("heartbeat_at", sa.Float(), nullable=False),
        ], []),
    }


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, (columns, indexes) in _tables().items():
        if name in existing:
            continue
        op.create_table(name, *columns)
        for index, cols, unique in indexes:
            op.create_index(index, name, cols, unique=unique)


def downgrade() -> None:
    for name in reversed(list(_tables())):
        op.drop_table(name)
