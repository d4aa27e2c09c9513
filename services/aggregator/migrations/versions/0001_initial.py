"""Initial aggregator schema: jobs, rounds, assignments, accepted updates (tables prefixed ``agg_``).

Revision ID: a0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agg_jobs",
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("current_round", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(160), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", name="pk_agg_jobs"),
    )
    op.create_table(
        "agg_rounds",
        sa.Column("round_id", sa.String(160), nullable=False),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(160), nullable=False),
        sa.Column("opened_at", sa.Float(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False),
        sa.Column("result_version", sa.String(160), nullable=False),
        sa.Column("closed_at", sa.Float(), nullable=False),
        sa.Column("extensions", sa.Integer(), nullable=False),
        sa.Column("bytes_down", sa.BigInteger(), nullable=False),
        sa.Column("bytes_up", sa.BigInteger(), nullable=False),
        sa.Column("full_model_bytes", sa.BigInteger(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.Integer(), nullable=False),
        sa.Column("mean_train_loss", sa.Float(), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("round_id", name="pk_agg_rounds"),
        sa.ForeignKeyConstraint(["job_id"], ["agg_jobs.job_id"], name="fk_agg_rounds_job_id_agg_jobs"),
        sa.UniqueConstraint("job_id", "index", name="uq_agg_rounds_job_id_index"),
    )
    op.create_index("ix_agg_rounds_job_id", "agg_rounds", ["job_id"])
    op.create_table(
        "agg_assignments",
        sa.Column("ticket_id", sa.String(64), nullable=False),
        sa.Column("round_id", sa.String(160), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("download_bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("ticket_id", name="pk_agg_assignments"),
        sa.ForeignKeyConstraint(["round_id"], ["agg_rounds.round_id"], name="fk_agg_assignments_round_id_agg_rounds"),
        # A device gets at most one assignment per round, enforced by the database too.
        sa.UniqueConstraint("round_id", "device_id", name="uq_agg_assignments_round_id_device_id"),
    )
    op.create_index("ix_agg_assignments_round_id", "agg_assignments", ["round_id"])
    op.create_table(
        "agg_updates",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("round_id", sa.String(160), nullable=False),
        sa.Column("ticket_id", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("sample_count", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("accepted_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_agg_updates"),
        sa.ForeignKeyConstraint(["round_id"], ["agg_rounds.round_id"], name="fk_agg_updates_round_id_agg_rounds"),
        sa.UniqueConstraint("ticket_id", name="uq_agg_updates_ticket_id"),
    )
    op.create_index("ix_agg_updates_round_id", "agg_updates", ["round_id"])


def downgrade() -> None:
    op.drop_table("agg_updates")
    op.drop_table("agg_assignments")
    op.drop_table("agg_rounds")
    op.drop_table("agg_jobs")
