"""The SQL device repository (SQLAlchemy 2.x ORM): SQLite by default, PostgreSQL in production."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Engine, Select, Table, and_, bindparam, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from raffm.errors import AlreadyExistsError, excerpt
from raffm.profile import DeviceProfile
from services.registry.db import DATABASE
from services.registry.domain import Device, DeviceState, ProfileRecord
from services.registry.models import DeviceRow, FleetRow, ProfileRow, TokenRow
from services.registry.repository import TokenOwner

log = logging.getLogger(__name__)
_ONLINE, _OFFLINE, _GONE = DeviceState.ONLINE.value, DeviceState.OFFLINE.value, DeviceState.DEREGISTERED.value


def _profile_of(row: ProfileRow) -> DeviceProfile:
    return DeviceProfile(
        train_memory_mb=row.train_memory_mb, infer_memory_mb=row.infer_memory_mb, gflops=row.gflops,
        up_mbps=row.up_mbps, down_mbps=row.down_mbps, tier=row.tier, battery_pct=row.battery_pct,
        window_start_min=row.window_start_min, window_end_min=row.window_end_min,
    )


def _profile_row(device_id: str, version: int, profile: DeviceProfile, now: datetime) -> ProfileRow:
    return ProfileRow(
        device_id=device_id, version=version, recorded_at=now, tier=profile.tier,
        train_memory_mb=profile.train_memory_mb, infer_memory_mb=profile.infer_memory_mb, gflops=profile.gflops,
        up_mbps=profile.up_mbps, down_mbps=profile.down_mbps, battery_pct=profile.battery_pct,
        window_start_min=profile.window_start_min, window_end_min=profile.window_end_min,
    )


def _device_of(result: Any) -> Device:
    """Domain device from a (DeviceRow, fleet name, ProfileRow) result row of ``_device_query``."""
    row, fleet, profile = result[0], result[1], result[2]
    return Device(
        device_id=row.id, name=row.name, fleet=fleet, state=DeviceState(row.state), tier=row.tier,
        profile=_profile_of(profile), profile_version=row.profile_version, created_at=row.created_at,
        last_seen=row.last_seen,
    )


_DEVICES = cast(Table, DeviceRow.__table__)
_TOUCH = (
    update(_DEVICES).where(_DEVICES.c.id == bindparam("b_id"), _DEVICES.c.state != _GONE)
    .values(last_seen=bindparam("b_seen"), state=_ONLINE)
)


def _device_query() -> Select[DeviceRow, str, ProfileRow]:
    """Device rows with their fleet name and current profile."""
    return (
        select(DeviceRow, FleetRow.name, ProfileRow)
        .join(FleetRow, FleetRow.id == DeviceRow.fleet_id)
        .join(ProfileRow, and_(ProfileRow.device_id == DeviceRow.id, ProfileRow.version == DeviceRow.profile_version))
    )


class SqlDeviceRepository:
    """DeviceRepository over SQLAlchemy; one short transaction per method."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # SQLite allows one writer; serialising this process's writers avoids lock-upgrade deadlocks between
        # transactions that read then write (the busy timeout still covers other processes).
        self._write_lock: Any = threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()

    @classmethod
    def open(cls, url: str) -> SqlDeviceRepository:
        """Connect and migrate to the latest schema."""
        engine = DATABASE.engine(url)
        revision = DATABASE.migrate(engine)
        log.info("registry database %s at schema revision %s", engine.url.render_as_string(hide_password=True),
                 revision)
        return cls(engine)

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions.begin() as session:
            yield session

    def ensure_fleet(self, fleet: str, enroll_key_hash: str, now: datetime) -> None:
        with self._write() as s:
            row = s.scalar(select(FleetRow).where(FleetRow.name == fleet))
            if row is None:
                s.add(FleetRow(name=fleet, enroll_key_hash=enroll_key_hash, created_at=now))
            elif row.enroll_key_hash != enroll_key_hash:
                row.enroll_key_hash = enroll_key_hash

    def fleet_for_key(self, enroll_key_hash: str) -> str | None:
        with self._read() as s:
            return s.scalar(select(FleetRow.name).where(FleetRow.enroll_key_hash == enroll_key_hash))

    def find_active_by_name(self, fleet: str, name: str) -> Device | None:
        with self._read() as s:
            row = s.execute(
                _device_query().where(FleetRow.name == fleet, DeviceRow.name == name, DeviceRow.state != _GONE)
            ).first()
            return _device_of(row) if row else None

    def create_device(self, device: Device, token_hash: str) -> None:
        try:
            with self._write() as s:
                fleet_id = s.scalar(select(FleetRow.id).where(FleetRow.name == device.fleet))
                if fleet_id is None:
                    raise LookupError(f"fleet {excerpt(device.fleet)} does not exist")
                s.add(DeviceRow(
                    id=device.device_id, fleet_id=fleet_id, name=device.name, tier=device.profile.tier,
                    state=device.state.value, profile_version=1, created_at=device.created_at,
                    last_seen=device.last_seen,
                ))
                s.flush()  # the device row must exist before rows that reference it
                s.add(_profile_row(device.device_id, 1, device.profile, device.created_at))
                s.add(TokenRow(device_id=device.device_id, token_hash=token_hash, created_at=device.created_at))
        except IntegrityError as exc:  # lost a race for the name (or a proposed token): a unique index said no
            raise AlreadyExistsError(f"device name {excerpt(device.name)} is taken in fleet {excerpt(device.fleet)}",
                                     field="name") from exc

    def token_owner(self, token_hash: str) -> TokenOwner | None:
        with self._read() as s:
            row = s.execute(
                select(DeviceRow.id, FleetRow.name, DeviceRow.state, DeviceRow.tier, DeviceRow.last_seen)
                .join(TokenRow, TokenRow.device_id == DeviceRow.id)
                .join(FleetRow, FleetRow.id == DeviceRow.fleet_id)
                .where(TokenRow.token_hash == token_hash, TokenRow.revoked_at.is_(None), DeviceRow.state != _GONE)
            ).first()
            if row is None:
                return None
            return TokenOwner(row[0], row[1], DeviceState(row[2]), row[3], row[4])

    def token_used(self, token_hash: str) -> bool:
        with self._read() as s:
            return s.scalar(select(TokenRow.id).where(TokenRow.token_hash == token_hash)) is not None

    def get(self, device_id: str) -> Device | None:
        with self._read() as s:
            row = s.execute(_device_query().where(DeviceRow.id == device_id)).first()
            return _device_of(row) if row else None

    def history(self, device_id: str) -> list[ProfileRecord]:
        with self._read() as s:
            rows = s.scalars(select(ProfileRow).where(ProfileRow.device_id == device_id).order_by(ProfileRow.version))
            return [ProfileRecord(r.version, _profile_of(r), r.recorded_at) for r in rows]

    def update_profile(self, device_id: str, profile: DeviceProfile, now: datetime) -> tuple[int, bool]:
        with self._write() as s:
            device = s.get(DeviceRow, device_id, with_for_update=True)
            if device is None:
                raise LookupError(f"device {device_id!r} does not exist")
            current = s.scalar(select(ProfileRow).where(
                ProfileRow.device_id == device_id, ProfileRow.version == device.profile_version))
            if current is not None and _profile_of(current) == profile:
                return device.profile_version, False
            device.profile_version += 1
            device.tier = profile.tier
            s.add(_profile_row(device_id, device.profile_version, profile, now))
            return device.profile_version, True

    def touch(self, device_id: str, now: datetime) -> DeviceState | None:
        with self._write() as s:
            result = s.execute(
                update(DeviceRow).where(DeviceRow.id == device_id, DeviceRow.state != _GONE)
                .values(last_seen=now, state=_ONLINE)
            )
            if result.rowcount == 1:  # type: ignore[attr-defined]
                return DeviceState.ONLINE
            state = s.scalar(select(DeviceRow.state).where(DeviceRow.id == device_id))
            return DeviceState(state) if state else None

    def touch_nowait(self, device_id: str, now: datetime) -> DeviceState | None:
        return None  # every touch is a transaction; wrap in LivenessBuffer to batch them

    def touch_many(self, seen: Mapping[str, datetime]) -> None:
        if not seen:
            return
        with self._write() as s:  # one executemany: a Core UPDATE per device, one commit for all
            s.connection().execute(_TOUCH, [{"b_id": d, "b_seen": t} for d, t in seen.items()])

    def list(
        self, *, fleet: str | None, state: DeviceState | None, tier: str | None, stale_before: datetime,
        after_id: str | None, limit: int,
    ) -> list[Device]:
        query = _device_query()
        stale = and_(DeviceRow.state == _ONLINE, DeviceRow.last_seen < stale_before)
        if state is None:
            query = query.where(DeviceRow.state != _GONE)
        elif state is DeviceState.ONLINE:
            query = query.where(DeviceRow.state == _ONLINE, DeviceRow.last_seen >= stale_before)
        elif state is DeviceState.OFFLINE:
            query = query.where(or_(DeviceRow.state == _OFFLINE, stale))
        else:
            query = query.where(DeviceRow.state == _GONE)
        if fleet:
            query = query.where(FleetRow.name == fleet)
        if tier:
            query = query.where(DeviceRow.tier == tier)
        if after_id is not None:
            query = query.where(DeviceRow.id > after_id)
        with self._read() as s:
            return [_device_of(row) for row in s.execute(query.order_by(DeviceRow.id).limit(limit))]

    def deregister(self, device_id: str, now: datetime) -> bool:
        with self._write() as s:
            result = s.execute(
                update(DeviceRow).where(DeviceRow.id == device_id, DeviceRow.state != _GONE)
                .values(state=_GONE, deregistered_at=now)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return False
            s.execute(update(TokenRow).where(TokenRow.device_id == device_id, TokenRow.revoked_at.is_(None))
                      .values(revoked_at=now))
            return True

    def mark_stale_offline(self, stale_before: datetime) -> int:
        with self._write() as s:
            result = s.execute(
                update(DeviceRow).where(DeviceRow.state == _ONLINE, DeviceRow.last_seen < stale_before)
                .values(state=_OFFLINE)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

    def count_by_state_tier(self, stale_before: datetime) -> Mapping[tuple[DeviceState, str], int]:
        with self._read() as s:
            counts: dict[tuple[DeviceState, str], int] = {}
            for state, tier, n in s.execute(
                select(DeviceRow.state, DeviceRow.tier, func.count()).group_by(DeviceRow.state, DeviceRow.tier)
            ):
                counts[(DeviceState(state), tier)] = int(n)
            # Online rows past the window count as offline (the sweeper may not have persisted that yet).
            for tier, n in s.execute(
                select(DeviceRow.tier, func.count())
                .where(DeviceRow.state == _ONLINE, DeviceRow.last_seen < stale_before).group_by(DeviceRow.tier)
            ):
                counts[(DeviceState.ONLINE, tier)] -= int(n)
                counts[(DeviceState.OFFLINE, tier)] = counts.get((DeviceState.OFFLINE, tier), 0) + int(n)
            return counts

    def close(self) -> None:
        self.engine.dispose()
