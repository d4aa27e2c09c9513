"""Write-behind heartbeats (services.registry.liveness.LivenessBuffer) over a real SQL repository: fresh reads before
the flush, the flush at close, offline at the same window, immediate deregistration, failed flushes kept."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime

import pytest

from raffm.errors import NotFoundError
from raffm.profile import DeviceProfile
from services.common.auth import Principal
from services.common.testing import FakeClock
from services.registry.domain import DeviceState
from services.registry.liveness import LivenessBuffer
from services.registry.repository import DeviceRepository, open_repository
from services.registry.service import RegistryService, RegistrySettings

KEY = "unit-enroll-key"
OPERATOR = Principal(subject="ops", is_operator=True)
PROFILE = DeviceProfile(train_memory_mb=1024, infer_memory_mb=0, gflops=5.0, up_mbps=5.0, down_mbps=10.0, tier="phone")


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A service over LivenessBuffer(SQL repository), with fake wall and monotonic clocks."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.storage: DeviceRepository = open_repository(url)
        self.monotonic = Monotonic()
        self.buffer = LivenessBuffer(self.storage, confirm_s=5.0, monotonic=self.monotonic)
        self.clock = FakeClock()
        self.service = RegistryService(self.buffer, RegistrySettings(liveness_window_s=30), clock=self.clock)
        self.service.enroll("default", KEY)

    def device(self, name: str = "d1") -> tuple[str, Principal]:
        reg = self.service.register(KEY, name, PROFILE)
        return reg.device_id, Principal(subject=reg.device_id, fleet="default")

    def stored_last_seen(self, device_id: str) -> datetime:
        device = self.storage.get(device_id)
        assert device is not None
        return device.last_seen


@pytest.fixture
def rig(sql_url: str) -> Iterator[Rig]:
    r = Rig(sql_url)
    yield r
    r.buffer.close()


def test_first_heartbeat_writes_through_then_later_ones_wait_for_the_flush(rig: Rig) -> None:
    device_id, me = rig.device()
    assert rig.service.heartbeat_nowait(me, device_id) is None  # not confirmed yet: the caller goes to a thread
    rig.clock.advance(1)
    state, first = rig.service.heartbeat(me, device_id)
    assert state is DeviceState.ONLINE and rig.stored_last_seen(device_id) == first
    rig.clock.advance(10)
    beat = rig.service.heartbeat_nowait(me, device_id)
    assert beat is not None and beat[0] is DeviceState.ONLINE
    # Not in SQL yet, but every read of the registry sees it.
    assert rig.stored_last_seen(device_id) == first and rig.buffer.pending() == 1
    assert rig.service.get_device(me, device_id)[0].last_seen == beat[1]
    assert rig.buffer.flush() == 1 and rig.buffer.pending() == 0
    assert rig.stored_last_seen(device_id) == beat[1]
    assert rig.buffer.flush() == 0


def test_a_verified_token_confirms_its_device(rig: Rig) -> None:
    reg = rig.service.register(KEY, "d1", PROFILE)
    me = rig.service.principal_for_token(reg.token)  # what the interceptor does on a token-cache miss
    assert me is not None
    rig.clock.advance(2)
    beat = rig.service.heartbeat_nowait(me, reg.device_id)  # no write-through needed
    assert beat is not None and rig.buffer.pending() == 1
    rig.service.deregister(me, reg.device_id)
    assert rig.service.principal_for_token(reg.token) is None
    assert rig.service.heartbeat_nowait(me, reg.device_id) is None


def test_verify_token_and_listings_see_pending_heartbeats(rig: Rig) -> None:
    reg = rig.service.register(KEY, "d1", PROFILE)
    me = Principal(subject=reg.device_id, fleet="default")
    rig.service.heartbeat(me, reg.device_id)
    rig.clock.advance(25)
    assert rig.service.heartbeat_nowait(me, reg.device_id) is not None
    rig.clock.advance(10)  # 35 s after the last SQL write, 10 s after the last heartbeat: still online
    assert rig.service.verify_token(OPERATOR, reg.token).state is DeviceState.ONLINE
    assert rig.buffer.pending() == 1
    online = rig.service.list_devices(OPERATOR, state=DeviceState.ONLINE).devices
    assert [d.device_id for d in online] == [reg.device_id]
    assert rig.service.device_counts()[(DeviceState.ONLINE, "phone")] == 1


def test_a_silent_device_goes_offline_at_the_same_window(rig: Rig) -> None:
    device_id, me = rig.device()
    rig.service.heartbeat(me, device_id)
    rig.clock.advance(20)
    assert rig.service.heartbeat_nowait(me, device_id) is not None  # in memory only
    rig.clock.advance(20)  # 40 s after the SQL write, 20 s after the heartbeat
    assert rig.service.sweep() == 0  # the sweep flushed first: the fresh heartbeat counts
    assert rig.service.get_device(me, device_id)[0].state is DeviceState.ONLINE
    rig.clock.advance(10.001)  # now 30 s silent
    assert rig.service.get_device(me, device_id)[0].state is DeviceState.OFFLINE
    assert rig.service.sweep() == 1
    assert rig.storage.get(device_id).state is DeviceState.OFFLINE  # type: ignore[union-attr]
    # A heartbeat brings it back at once, even before the flush.
    assert rig.service.heartbeat_nowait(me, device_id) is not None
    assert rig.service.get_device(me, device_id)[0].state is DeviceState.ONLINE
    rig.buffer.flush()
    assert rig.storage.get(device_id).state is DeviceState.ONLINE  # type: ignore[union-attr]


def test_close_flushes_pending_heartbeats(sql_url: str) -> None:
    rig = Rig(sql_url)
    device_id, me = rig.device()
    rig.service.heartbeat(me, device_id)
    rig.clock.advance(7)
    beat = rig.service.heartbeat_nowait(me, device_id)
    assert beat is not None
    rig.buffer.close()
    reopened = open_repository(sql_url)
    try:
        device = reopened.get(device_id)
        assert device is not None and device.last_seen == beat[1]
    finally:
        reopened.close()


def test_deregistration_takes_effect_at_once(rig: Rig) -> None:
    device_id, me = rig.device()
    rig.service.heartbeat(me, device_id)
    rig.clock.advance(1)
    assert rig.service.heartbeat_nowait(me, device_id) is not None
    rig.service.deregister(me, device_id)
    assert rig.buffer.pending() == 0
    # The next heartbeat goes to the database again, which says deregistered; nothing resurrects the row.
    assert rig.service.heartbeat_nowait(me, device_id) is None
    assert rig.service.heartbeat(me, device_id)[0] is DeviceState.DEREGISTERED
    rig.buffer.flush()
    assert rig.storage.get(device_id).state is DeviceState.DEREGISTERED  # type: ignore[union-attr]
    assert rig.service.get_device(OPERATOR, device_id)[0].state is DeviceState.DEREGISTERED


def test_a_deregistration_elsewhere_is_noticed_within_the_confirmation_interval(rig: Rig) -> None:
    device_id, me = rig.device()
    rig.service.heartbeat(me, device_id)
    rig.storage.deregister(device_id, rig.clock())  # another registry process on the same database
    assert rig.service.heartbeat_nowait(me, device_id) is not None  # still confirmed here
    rig.buffer.flush()
    assert rig.storage.get(device_id).state is DeviceState.DEREGISTERED  # type: ignore[union-attr]
    rig.monotonic.now += 5.0
    assert rig.service.heartbeat_nowait(me, device_id) is None
    assert rig.service.heartbeat(me, device_id)[0] is DeviceState.DEREGISTERED


def test_unknown_devices_are_not_found_without_being_buffered(rig: Rig) -> None:
    with pytest.raises(NotFoundError):
        rig.service.heartbeat(OPERATOR, "0" * 32)
    assert rig.service.heartbeat_nowait(OPERATOR, "0" * 32) is None and rig.buffer.pending() == 0


def test_a_failed_flush_keeps_the_pending_times(rig: Rig) -> None:
    device_id, me = rig.device()
    rig.service.heartbeat(me, device_id)
    rig.clock.advance(3)
    beat = rig.service.heartbeat_nowait(me, device_id)
    assert beat is not None

    def refuse(seen: Mapping[str, datetime]) -> None:
        raise ConnectionError("database unavailable")

    real = rig.storage.touch_many
    rig.storage.touch_many = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        rig.buffer.flush()
    assert rig.buffer.pending() == 1
    rig.storage.touch_many = real  # type: ignore[method-assign]
    assert rig.buffer.flush() == 1 and rig.stored_last_seen(device_id) == beat[1]
