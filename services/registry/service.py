"""Registry use cases: one method per RPC, synchronous, on top of a DeviceRepository and a clock."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from raffm.errors import AlreadyExistsError, AuthenticationError, NotFoundError, ValidationError, excerpt
from raffm.profile import TIERS, DeviceProfile
from services.common.auth import Principal, authorize_device, hash_token, new_token, require_operator
from services.registry.domain import (
    MAX_FLEET_LEN, Device, DeviceState, ProfileRecord, clamp_page_size, decode_page_token, effective_state,
    encode_page_token, stale_cutoff, validate_device_id, validate_name, validate_profile, validate_proposed_token,
)
from services.registry.metrics import RegistryMetrics
from services.registry.repository import DeviceRepository, TokenOwner

log = logging.getLogger(__name__)
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class RegistrySettings:
    """Liveness policy: a device silent for ``liveness_window_s`` is offline; it should heartbeat 3x per window."""

    liveness_window_s: float = 90.0

    def __post_init__(self) -> None:
        if not self.liveness_window_s > 0:
            raise ValidationError(f"liveness window must be > 0 s, got {self.liveness_window_s}",
                                  field="--liveness-window-s")

    @property
    def heartbeat_interval_s(self) -> float:
        return self.liveness_window_s / 3


@dataclass(frozen=True)
class Registration:
    device_id: str
    token: str
    created: bool
    profile_version: int


@dataclass(frozen=True)
class DevicePage:
    devices: list[Device]
    next_page_token: str


class RegistryService:
    """The registry's use cases. Every write is validated before anything is stored."""

    def __init__(
        self, repo: DeviceRepository, settings: RegistrySettings | None = None, *, clock: Clock = utc_now,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        self.repo, self.settings, self.clock, self.metrics = repo, settings or RegistrySettings(), clock, metrics

    def _stale_before(self, now: datetime | None = None) -> datetime:
        return stale_cutoff(now or self.clock(), self.settings.liveness_window_s)

    def _live(self, device: Device, now: datetime | None = None) -> Device:
        state = effective_state(device.state, device.last_seen, self._stale_before(now))
        return device if state is device.state else replace(device, state=state)

    def _require(self, device_id: str) -> Device:
        device = self.repo.get(validate_device_id(device_id))
        if device is None:
            raise NotFoundError(f"device {excerpt(device_id)} is not registered", field="device_id")
        return device

    # --- fleet set-up -------------------------------------------------------------------------------------------

    def enroll(self, fleet: str, enroll_key: str) -> None:
        """Create the fleet (or rotate its key) so devices holding ``enroll_key`` can register into it."""
        validate_name(fleet, "fleet", MAX_FLEET_LEN)
        if not enroll_key:
            raise ValidationError("the enrollment key must not be empty", field="--enroll-key")
        self.repo.ensure_fleet(fleet, hash_token(enroll_key), self.clock())

    # --- device calls ---------------------------------------------------------------------------------------------

    def register(self, enroll_key: str, name: str, profile: DeviceProfile, device_token: str = "") -> Registration:
        """Create a device, or update an existing one when its own token comes with the request.

        A new device gets ``device_token`` as its token when the device proposed one no device ever held (see
        ``RegisterRequest.device_token``), so repeating a registration whose reply was lost returns the same device
        instead of ALREADY_EXISTS, even while the first request is still being processed.
        """
        if not enroll_key:
            raise AuthenticationError("enroll_key is missing", field="enroll_key",
                                      hint="ask the fleet operator for the enrollment key")
        fleet = self.repo.fleet_for_key(hash_token(enroll_key))
        if fleet is None:
            raise AuthenticationError("enroll_key is not valid for any fleet", field="enroll_key",
                                      hint="check the enrollment key with the fleet operator")
        validate_name(name)
        validate_profile(profile)
        now = self.clock()
        existing = self.repo.find_active_by_name(fleet, name)
        if existing is None:
            token = self._token_for_new_device(device_token)
            device = Device(
                device_id=uuid.uuid4().hex, name=name, fleet=fleet, state=DeviceState.ONLINE, tier=profile.tier,
                profile=profile, profile_version=1, created_at=now, last_seen=now,
            )
            try:
                self.repo.create_device(device, hash_token(token))
            except AlreadyExistsError:  # lost a race for the name, perhaps to this same request sent twice
                existing = self.repo.find_active_by_name(fleet, name)
                if existing is None:
                    raise
            else:
                self._count("created")
                log.info("registered device %s (%s, tier %s) in fleet %s", device.device_id, name, profile.tier, fleet)
                return Registration(device.device_id, token, True, 1)
        owner = self.repo.token_owner(hash_token(device_token)) if device_token else None
        if owner is None or owner.device_id != existing.device_id:
            raise AlreadyExistsError(f"device name {excerpt(name)} is already registered in fleet {excerpt(fleet)}",
                                     field="name")
        version, _ = self.repo.update_profile(existing.device_id, profile, now)
        self.repo.touch(existing.device_id, now)
        self._count("updated")
        return Registration(existing.device_id, device_token, False, version)

    def _token_for_new_device(self, proposed: str) -> str:
        """The proposed token if it is well-formed and was never issued; otherwise a fresh one (a device
        re-registering after deregistration sends its old, revoked token: it gets a new one)."""
        if not proposed:
            return new_token()
        validate_proposed_token(proposed)
        return new_token() if self.repo.token_used(hash_token(proposed)) else proposed

    def heartbeat(self, principal: Principal, device_id: str) -> tuple[DeviceState, datetime]:
        authorize_device(principal, validate_device_id(device_id))
        now = self.clock()
        state = self.repo.touch(device_id, now)
        if state is None:
            raise NotFoundError(f"device {excerpt(device_id)} is not registered", field="device_id")
        return state, now

    def heartbeat_nowait(self, principal: Principal, device_id: str) -> tuple[DeviceState, datetime] | None:
        """``heartbeat`` if the repository can record it without blocking IO (safe on the event loop); None: call
        ``heartbeat`` in a worker thread."""
        authorize_device(principal, validate_device_id(device_id))
        now = self.clock()
        state = self.repo.touch_nowait(device_id, now)
        if state is None:
            return None
        return state, now

    def update_profile(self, principal: Principal, device_id: str, profile: DeviceProfile) -> tuple[int, bool]:
        authorize_device(principal, validate_device_id(device_id))
        validate_profile(profile)
        device = self._require(device_id)
        if device.state is DeviceState.DEREGISTERED:
            raise NotFoundError(f"device {excerpt(device_id)} is deregistered", field="device_id")
        return self.repo.update_profile(device_id, profile, self.clock())

    def get_device(
        self, principal: Principal, device_id: str, include_history: bool = False
    ) -> tuple[Device, list[ProfileRecord]]:
        authorize_device(principal, validate_device_id(device_id))
        device = self._live(self._require(device_id))
        return device, self.repo.history(device_id) if include_history else []

    def list_devices(
        self, principal: Principal, *, state: DeviceState | None = None, tier: str = "", fleet: str = "",
        page_size: int = 0, page_token: str = "",
    ) -> DevicePage:
        require_operator(principal, "ListDevices")
        if tier and tier not in TIERS:
            raise ValidationError(f"tier {excerpt(tier)} is unknown; use one of {', '.join(TIERS)}", field="tier")
        limit = clamp_page_size(page_size)
        after = decode_page_token(page_token)
        now = self.clock()
        rows = self.repo.list(fleet=fleet or None, state=state, tier=tier or None,
                              stale_before=self._stale_before(now), after_id=after, limit=limit + 1)
        page = [self._live(d, now) for d in rows[:limit]]
        next_token = encode_page_token(page[-1].device_id) if len(rows) > limit else ""
        return DevicePage(page, next_token)

    def deregister(self, principal: Principal, device_id: str) -> None:
        authorize_device(principal, validate_device_id(device_id))
        if not self.repo.deregister(device_id, self.clock()):
            raise NotFoundError(f"device {excerpt(device_id)} is not registered (or already deregistered)",
                                field="device_id")
        log.info("deregistered device %s", device_id)

    # --- services and housekeeping -----------------------------------------------------------------------------------

    def verify_token(self, principal: Principal, token: str) -> TokenOwner:
        """VerifyToken RPC: for other services, holding an operator token."""
        require_operator(principal, "VerifyToken")
        owner = self.repo.token_owner(hash_token(token)) if token else None
        if owner is None:
            raise AuthenticationError("the device token is unknown or revoked", field="token")
        state = effective_state(owner.state, owner.last_seen, self._stale_before())
        return replace(owner, state=state)

    def principal_for_token(self, token: str) -> Principal | None:
        """The device a bearer token authenticates, for the registry's own interceptor."""
        owner = self.repo.token_owner(hash_token(token))
        return Principal(subject=owner.device_id, fleet=owner.fleet) if owner else None

    def sweep(self) -> int:
        """Persist offline for silent devices; returns how many were newly marked."""
        stale_before = self._stale_before()
        changed = self.repo.mark_stale_offline(stale_before)
        if self.metrics is not None:
            self.metrics.marked_offline.inc(changed)
        if changed:
            log.info("marked %d silent device(s) offline", changed)
        return changed

    def device_counts(self) -> Mapping[tuple[DeviceState, str], int]:
        """Devices by effective state and tier (for the device gauge)."""
        return self.repo.count_by_state_tier(self._stale_before())

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.registrations.labels(result).inc()
