"""Per-key daily quota counters, reserved before work runs.

A request reserves its images (and its worst-case cost) in one conditional UPDATE that
succeeds only while the day's total stays within the key's quota, so concurrent
requests, batch items and several server processes cannot overshoot it; what was not
used is released when the request ends.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quota_days",
        sa.Column("owner", sa.String(40), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),  # UTC, YYYY-MM-DD
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("usd", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quota_days")
