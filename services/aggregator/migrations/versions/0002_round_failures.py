"""Rounds record why their devices gave up: agg_rounds.failures (JSON, by failure reason: devices and latest detail).

Revision ID: a0002
Revises: a0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a0002"
down_revision = "a0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agg_rounds") as batch:
        batch.add_column(sa.Column("failures", sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table("agg_rounds") as batch:
        batch.drop_column("failures")
