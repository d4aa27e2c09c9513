"""Write-behind heartbeats: a DeviceRepository decorator that keeps last-seen times in memory and writes them in
batches.

A heartbeat was one SQL transaction (UPDATE + COMMIT under SQLite's single-writer lock) in a worker thread; at a
few thousand devices per second the writers queue behind each other. Here a heartbeat of a device this process has
confirmed recently (active, per the database, within ``confirm_s``) is a dict update on the event loop;
:meth:`LivenessBuffer.flush` writes every pending last-seen time in one transaction (``touch_many``). A device is
confirmed by a heartbeat written through, or by the verification of one of its tokens (``token_owner``: only active
devices have live tokens), which is what a device's heartbeat after a token-cache miss costs: one read, no write.
An unconfirmed device's heartbeat goes to the database, so an unknown device is NOT_FOUND at once. A device
deregistered through another registry process: its own tokens are refused there within the token-cache TTL; an
operator's heartbeat for it may still answer ONLINE for up to ``confirm_s`` (the row is never changed).

What the buffer guarantees:
- Reads see fresh data: ``get`` and ``token_owner`` overlay the pending times; ``list``, ``count_by_state_tier``
  and ``mark_stale_offline`` flush first, so their SQL filters on ``last_seen`` see every heartbeat received.
  A silent device therefore goes offline at the same liveness window as before.
- Deregistration through this process is immediate: it forgets the device's pending time and confirmation before
  it writes, and the batched UPDATE never touches a deregistered row.
- A crash loses at most the last flush interval of last-seen updates (plus however long the database has been
  refusing flushes): after a restart those devices read as last seen up to that much earlier. ``close()`` flushes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime

from raffm.profile import DeviceProfile
from services.registry.domain import Device, DeviceState, ProfileRecord
from services.registry.repository import DeviceRepository, TokenOwner

log = logging.getLogger(__name__)


class LivenessBuffer:
    """DeviceRepository with write-behind heartbeats over ``inner``; thread-safe. Call :meth:`flush` periodically."""

    def __init__(self, inner: DeviceRepository, *, confirm_s: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.inner, self._confirm_s, self._monotonic = inner, confirm_s, monotonic
        self._lock = threading.Lock()  # guards the two dicts; never held across database calls
        self._flush_lock = threading.Lock()  # one flush at a time
        self._confirmed: dict[str, float] = {}  # device id -> monotonic time until which it needs no database check
        self._pending: dict[str, datetime] = {}  # device id -> last seen, not yet written
        self._forgotten = 0  # deregistrations so far: a write-through racing one must not confirm its device
        self._next_prune = 0.0

    # --- heartbeats -----------------------------------------------------------------------------------------------

    def touch_nowait(self, device_id: str, now: datetime) -> DeviceState | None:
        """Record a heartbeat in memory if the device was confirmed recently: ONLINE. None: call :meth:`touch`."""
        with self._lock:
            until = self._confirmed.get(device_id)
            if until is None or until <= self._monotonic():
                return None
            if (seen := self._pending.get(device_id)) is None or seen < now:
                self._pending[device_id] = now
            return DeviceState.ONLINE

    def touch(self, device_id: str, now: datetime) -> DeviceState | None:
        if (state := self.touch_nowait(device_id, now)) is not None:
            return state
        with self._lock:
            confirmed_at, forgotten = self._monotonic(), self._forgotten
        state = self.inner.touch(device_id, now)  # written through: this also confirms the device exists
        if state is DeviceState.ONLINE:
            self._confirm(device_id, confirmed_at, forgotten)
        return state

    def _confirm(self, device_id: str, confirmed_at: float, forgotten: int) -> None:
        """The database said the device is active at ``confirmed_at``, unless a deregistration came in since."""
        if self._confirm_s > 0:
            with self._lock:
                if self._forgotten == forgotten:
                    self._confirmed[device_id] = max(self._confirmed.get(device_id, 0.0),
                                                     confirmed_at + self._confirm_s)

    def touch_many(self, seen: Mapping[str, datetime]) -> None:
        self.inner.touch_many(seen)

    def flush(self) -> int:
        """Write the pending last-seen times in one transaction; returns how many. Failed writes stay pending."""
        with self._flush_lock:
            with self._lock:
                self._prune()
                batch = dict(self._pending)
            if not batch:
                return 0
            self.inner.touch_many(batch)
            with self._lock:  # keep times that arrived during the write; they are newer
                for device_id, seen in batch.items():
                    if self._pending.get(device_id) == seen:
                        del self._pending[device_id]
            return len(batch)

    def _prune(self) -> None:
        """Drop expired confirmations (devices that stopped heartbeating), at most once per ``confirm_s``."""
        now = self._monotonic()
        if now >= self._next_prune:
            self._confirmed = {d: until for d, until in self._confirmed.items() if until > now}
            self._next_prune = now + self._confirm_s

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _overlay(self, device_id: str) -> datetime | None:
        with self._lock:
            return self._pending.get(device_id)

    def _forget(self, device_id: str) -> None:
        with self._lock:
            self._forgotten += 1
            self._confirmed.pop(device_id, None)
            self._pending.pop(device_id, None)

    # --- reads: pending times overlaid, or flushed first where SQL filters on last_seen -----------------------------

    def get(self, device_id: str) -> Device | None:
        device = self.inner.get(device_id)
        seen = self._overlay(device_id)
        if device is None or seen is None or device.state is DeviceState.DEREGISTERED or seen <= device.last_seen:
            return device
        return replace(device, last_seen=seen, state=DeviceState.ONLINE)

    def history(self, device_id: str) -> list[ProfileRecord]:
        return self.inner.history(device_id)

    def token_owner(self, token_hash: str) -> TokenOwner | None:
        with self._lock:
            confirmed_at, forgotten = self._monotonic(), self._forgotten
        owner = self.inner.token_owner(token_hash)
        if owner is None:
            return None
        # A live token is a live device: the heartbeat this token verification is usually for needs no write.
        self._confirm(owner.device_id, confirmed_at, forgotten)
        if (seen := self._overlay(owner.device_id)) is None or seen <= owner.last_seen:
            return owner
        return replace(owner, last_seen=seen, state=DeviceState.ONLINE)

    def token_used(self, token_hash: str) -> bool:
        return self.inner.token_used(token_hash)

    def list(
        self, *, fleet: str | None, state: DeviceState | None, tier: str | None, stale_before: datetime,
        after_id: str | None, limit: int,
    ) -> list[Device]:
        self.flush()
        return self.inner.list(fleet=fleet, state=state, tier=tier, stale_before=stale_before, after_id=after_id,
                               limit=limit)

    def mark_stale_offline(self, stale_before: datetime) -> int:
        self.flush()  # or a device whose fresh heartbeat is still in memory would be marked offline
        return self.inner.mark_stale_offline(stale_before)

    def count_by_state_tier(self, stale_before: datetime) -> Mapping[tuple[DeviceState, str], int]:
        self.flush()
        return self.inner.count_by_state_tier(stale_before)

    def find_active_by_name(self, fleet: str, name: str) -> Device | None:
        device = self.inner.find_active_by_name(fleet, name)
        return self.get(device.device_id) if device is not None else None

    # --- writes -------------------------------------------------------------------------------------------------------

    def deregister(self, device_id: str, now: datetime) -> bool:
        self._forget(device_id)
        return self.inner.deregister(device_id, now)

    def ensure_fleet(self, fleet: str, enroll_key_hash: str, now: datetime) -> None:
        self.inner.ensure_fleet(fleet, enroll_key_hash, now)

    def fleet_for_key(self, enroll_key_hash: str) -> str | None:
        return self.inner.fleet_for_key(enroll_key_hash)

    def create_device(self, device: Device, token_hash: str) -> None:
        self.inner.create_device(device, token_hash)

    def update_profile(self, device_id: str, profile: DeviceProfile, now: datetime) -> tuple[int, bool]:
        return self.inner.update_profile(device_id, profile, now)

    def close(self) -> None:
        """Flush what is pending, then close the inner repository (even if the flush fails)."""
        try:
            flushed = self.flush()
            if flushed:
                log.info("flushed %d pending heartbeat(s) at shutdown", flushed)
        finally:
            self.inner.close()
