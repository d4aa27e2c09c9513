"""The device repository interface, an in-memory implementation, and the URL-based factory.

Methods are synchronous and each one is its own transaction; the gRPC layer runs them in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from raffm.errors import AlreadyExistsError, excerpt
from raffm.profile import DeviceProfile
from services.registry.domain import Device, DeviceState, ProfileRecord, effective_state


@dataclass(frozen=True)
class TokenOwner:
    """The device a token belongs to."""

    device_id: str
    fleet: str
    state: DeviceState
    tier: str
    last_seen: datetime


class DeviceRepository(Protocol):
    """Persistence of fleets, devices, profile history and hashed tokens."""

    def ensure_fleet(self, fleet: str, enroll_key_hash: str, now: datetime) -> None:
        """Create the fleet, or set its enrollment key."""

    def fleet_for_key(self, enroll_key_hash: str) -> str | None: ...

    def find_active_by_name(self, fleet: str, name: str) -> Device | None:
        """The non-deregistered device called ``name`` in ``fleet``."""

    def create_device(self, device: Device, token_hash: str) -> None:
        """Insert device, first profile (version 1) and token; AlreadyExistsError if the name is taken."""

    def token_owner(self, token_hash: str) -> TokenOwner | None:
        """Owner of a live (unrevoked, not deregistered) token."""

    def token_used(self, token_hash: str) -> bool:
        """Whether any device ever held this token, revoked ones included (a token is never issued twice)."""

    def get(self, device_id: str) -> Device | None: ...

    def history(self, device_id: str) -> list[ProfileRecord]: ...

    def update_profile(self, device_id: str, profile: DeviceProfile, now: datetime) -> tuple[int, bool]:
        """Make ``profile`` current; append history only if it differs. Returns (version, changed)."""

    def touch(self, device_id: str, now: datetime) -> DeviceState | None:
        """Heartbeat: last_seen = now and state online (unless deregistered). None if the device is unknown."""

    def touch_nowait(self, device_id: str, now: datetime) -> DeviceState | None:
        """``touch`` if it can be done without blocking IO (on the event loop); None: call ``touch`` instead."""

    def touch_many(self, seen: Mapping[str, datetime]) -> None:
        """Batched heartbeats in one transaction: last_seen and state online for each device not deregistered."""

    def list(
        self, *, fleet: str | None, state: DeviceState | None, tier: str | None, stale_before: datetime,
        after_id: str | None, limit: int,
    ) -> list[Device]:
        """Devices ordered by id; ``state`` is the effective state (see domain.effective_state); None = not
        deregistered."""

    def deregister(self, device_id: str, now: datetime) -> bool:
        """Mark deregistered and revoke its tokens; False if unknown or already deregistered."""

    def mark_stale_offline(self, stale_before: datetime) -> int:
        """Persist offline for online devices last seen before ``stale_before``; returns how many."""

    def count_by_state_tier(self, stale_before: datetime) -> Mapping[tuple[DeviceState, str], int]:
        """Device counts by effective state and tier."""

    def close(self) -> None: ...


@dataclass
class _Stored:
    device: Device
    history: list[ProfileRecord]
    tokens: set[str]


class InMemoryDeviceRepository:
    """A dict-backed repository for tests and throw-away runs; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fleets: dict[str, str] = {}  # fleet -> enroll key hash
        self._devices: dict[str, _Stored] = {}
        self._token_index: dict[str, str] = {}  # token hash -> device id
        self._revoked: set[str] = set()  # hashes of tokens of deregistered devices

    def ensure_fleet(self, fleet: str, enroll_key_hash: str, now: datetime) -> None:
        with self._lock:
            self._fleets[fleet] = enroll_key_hash

    def fleet_for_key(self, enroll_key_hash: str) -> str | None:
        with self._lock:
            return next((f for f, h in self._fleets.items() if h == enroll_key_hash), None)

    def _active_by_name(self, fleet: str, name: str) -> Device | None:
        for stored in self._devices.values():
            d = stored.device
            if d.fleet == fleet and d.name == name and d.state is not DeviceState.DEREGISTERED:
                return d
        return None

    def find_active_by_name(self, fleet: str, name: str) -> Device | None:
        with self._lock:
            return self._active_by_name(fleet, name)

    def create_device(self, device: Device, token_hash: str) -> None:
        with self._lock:
            if self._active_by_name(device.fleet, device.name) is not None:
                raise AlreadyExistsError(f"device name {excerpt(device.name)} is taken in fleet {excerpt(device.fleet)}",
                                         field="name")
            record = ProfileRecord(1, device.profile, device.created_at)
            self._devices[device.device_id] = _Stored(replace(device, profile_version=1), [record], {token_hash})
            self._token_index[token_hash] = device.device_id

    def token_owner(self, token_hash: str) -> TokenOwner | None:
        with self._lock:
            device_id = self._token_index.get(token_hash)
            if device_id is None:
                return None
            d = self._devices[device_id].device
            if d.state is DeviceState.DEREGISTERED:
                return None
            return TokenOwner(d.device_id, d.fleet, d.state, d.tier, d.last_seen)

    def token_used(self, token_hash: str) -> bool:
        with self._lock:
            return token_hash in self._token_index or token_hash in self._revoked

    def get(self, device_id: str) -> Device | None:
        with self._lock:
            stored = self._devices.get(device_id)
            return stored.device if stored else None

    def history(self, device_id: str) -> list[ProfileRecord]:
        with self._lock:
            stored = self._devices.get(device_id)
            return list(stored.history) if stored else []

    def update_profile(self, device_id: str, profile: DeviceProfile, now: datetime) -> tuple[int, bool]:
        with self._lock:
            stored = self._devices[device_id]
            d = stored.device
            if d.profile == profile:
                return d.profile_version, False
            version = d.profile_version + 1
            stored.history.append(ProfileRecord(version, profile, now))
            stored.device = replace(d, profile=profile, profile_version=version, tier=profile.tier)
            return version, True

    def touch(self, device_id: str, now: datetime) -> DeviceState | None:
        with self._lock:
            stored = self._devices.get(device_id)
            if stored is None:
                return None
            d = stored.device
            if d.state is DeviceState.DEREGISTERED:
                return d.state
            stored.device = replace(d, last_seen=now, state=DeviceState.ONLINE)
            return DeviceState.ONLINE

    def touch_nowait(self, device_id: str, now: datetime) -> DeviceState | None:
        return self.touch(device_id, now)  # a dict update (None for an unknown device: touch says so again)

    def touch_many(self, seen: Mapping[str, datetime]) -> None:
        for device_id, now in seen.items():
            self.touch(device_id, now)

    def list(
        self, *, fleet: str | None, state: DeviceState | None, tier: str | None, stale_before: datetime,
        after_id: str | None, limit: int,
    ) -> list[Device]:
        with self._lock:
            rows = sorted(self._devices.values(), key=lambda s: s.device.device_id)
        out: list[Device] = []
        for stored in rows:
            d = stored.device
            eff = effective_state(d.state, d.last_seen, stale_before)
            if after_id is not None and d.device_id <= after_id:
                continue
            if fleet and d.fleet != fleet or tier and d.tier != tier:
                continue
            if (state is None and eff is DeviceState.DEREGISTERED) or (state is not None and eff is not state):
                continue
            out.append(d)
            if len(out) == limit:
                break
        return out

    def deregister(self, device_id: str, now: datetime) -> bool:
        with self._lock:
            stored = self._devices.get(device_id)
            if stored is None or stored.device.state is DeviceState.DEREGISTERED:
                return False
            stored.device = replace(stored.device, state=DeviceState.DEREGISTERED)
            for token in stored.tokens:
                self._token_index.pop(token, None)
            self._revoked |= stored.tokens
            stored.tokens.clear()
            return True

    def mark_stale_offline(self, stale_before: datetime) -> int:
        with self._lock:
            count = 0
            for stored in self._devices.values():
                d = stored.device
                if effective_state(d.state, d.last_seen, stale_before) is not d.state:
                    stored.device = replace(d, state=DeviceState.OFFLINE)
                    count += 1
            return count

    def count_by_state_tier(self, stale_before: datetime) -> Mapping[tuple[DeviceState, str], int]:
        with self._lock:
            counts: dict[tuple[DeviceState, str], int] = {}
            for stored in self._devices.values():
                d = stored.device
                key = (effective_state(d.state, d.last_seen, stale_before), d.tier)
                counts[key] = counts.get(key, 0) + 1
            return counts

    def close(self) -> None:
        pass


def open_repository(url: str) -> DeviceRepository:
    """``memory://`` for the in-memory repository; any SQLAlchemy URL (sqlite, postgresql+psycopg) for SQL.

    SQL databases are migrated to the latest schema first.
    """
    if url.startswith("memory:"):
        return InMemoryDeviceRepository()
    from services.registry.sql_repository import SqlDeviceRepository

    return SqlDeviceRepository.open(url)
