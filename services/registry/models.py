"""SQLAlchemy 2.x ORM models of the registry. The schema itself is owned by the Alembic migrations."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, TypeDecorator, UniqueConstraint, text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text; we store UTC and re-attach tz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class FleetRow(Base):
    __tablename__ = "fleets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    enroll_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet_id: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    name: Mapped[str] = mapped_column(String(128))
    tier: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    profile_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime())
    deregistered_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)

    __table_args__ = (
        # A name is unique in its fleet among devices that have not left; deregistered names can be reused.
        Index("uq_devices_fleet_name_active", "fleet_id", "name", unique=True,
              sqlite_where=text("state != 'deregistered'"), postgresql_where=text("state != 'deregistered'")),
        Index("ix_devices_state_last_seen", "state", "last_seen"),
        Index("ix_devices_tier", "tier"),
    )


class ProfileRow(Base):
    __tablename__ = "device_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime())
    tier: Mapped[str] = mapped_column(String(32))
    train_memory_mb: Mapped[int] = mapped_column(BigInteger)
    infer_memory_mb: Mapped[int] = mapped_column(BigInteger)
    gflops: Mapped[float] = mapped_column(Float)
    up_mbps: Mapped[float] = mapped_column(Float)
    down_mbps: Mapped[float] = mapped_column(Float)
    battery_pct: Mapped[float | None] = mapped_column(Float, nullable=True)
    window_start_min: Mapped[int | None] = mapped_column(Integer, nullable=True)
    window_end_min: Mapped[int | None] = mapped_column(Integer, nullable=True)

    __table_args__ = (UniqueConstraint("device_id", "version", name="uq_device_profiles_device_version"),)


class TokenRow(Base):
    __tablename__ = "device_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    # Hex SHA-256 of the bearer token; the token itself is never stored.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
