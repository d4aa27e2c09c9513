"""Initial registry schema: fleets, devices, profile history, hashed tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fleets",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("enroll_key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_fleets"),
        sa.UniqueConstraint("name", name="uq_fleets_name"),
        sa.UniqueConstraint("enroll_key_hash", name="uq_fleets_enroll_key_hash"),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("fleet_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("profile_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deregistered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.ForeignKeyConstraint(["fleet_id"], ["fleets.id"], name="fk_devices_fleet_id_fleets"),
    )
    op.create_index("uq_devices_fleet_name_active", "devices", ["fleet_id", "name"], unique=True,
                    sqlite_where=sa.text("state != 'deregistered'"),
                    postgresql_where=sa.text("state != 'deregistered'"))
    op.create_index("ix_devices_state_last_seen", "devices", ["state", "last_seen"])
    op.create_index("ix_devices_tier", "devices", ["tier"])
    op.create_table(
        "device_profiles",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("train_memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("infer_memory_mb", sa.BigInteger(), nullable=False),
        sa.Column("gflops", sa.Float(), nullable=False),
        sa.Column("up_mbps", sa.Float(), nullable=False),
        sa.Column("down_mbps", sa.Float(), nullable=False),
        sa.Column("battery_pct", sa.Float(), nullable=True),
        sa.Column("window_start_min", sa.Integer(), nullable=True),
        sa.Column("window_end_min", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_device_profiles"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE",
                                name="fk_device_profiles_device_id_devices"),
        sa.UniqueConstraint("device_id", "version", name="uq_device_profiles_device_version"),
    )
    op.create_table(
        "device_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_device_tokens"),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE",
                                name="fk_device_tokens_device_id_devices"),
        sa.UniqueConstraint("token_hash", name="uq_device_tokens_token_hash"),
    )
    op.create_index("ix_device_tokens_device_id", "device_tokens", ["device_id"])


def downgrade() -> None:
    op.drop_table("device_tokens")
    op.drop_table("device_profiles")
    op.drop_index("ix_devices_tier", table_name="devices")
    op.drop_index("ix_devices_state_last_seen", table_name="devices")
    op.drop_index("uq_devices_fleet_name_active", table_name="devices")
    op.drop_table("devices")
    op.drop_table("fleets")
