"""Closed-loop sizing: each assignment keeps the plan's predictions (with the declared profile they assumed) and the
device's report of what the round really cost (issue 14).

Revision ID: a0003
Revises: a0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a0003"
down_revision = "a0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows written before this revision have neither: an empty object reads as "nothing predicted, nothing reported".
    with op.batch_alter_table("agg_assignments") as batch:
        batch.add_column(sa.Column("predicted", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("report", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("agg_assignments") as batch:
        batch.drop_column("report")
        batch.drop_column("predicted")
