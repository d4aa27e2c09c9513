"""Registry use cases against both repository implementations (in-memory and SQLite), without gRPC."""

from __future__ import annotations

from dataclasses import replace

import pytest

from raffm.errors import AlreadyExistsError, AuthenticationError, NotFoundError, PermissionDeniedError, ValidationError
from raffm.profile import DeviceProfile
from services.common.auth import Principal
from services.common.testing import FakeClock
from services.registry.domain import DeviceState
from services.registry.liveness import LivenessBuffer
from services.registry.repository import InMemoryDeviceRepository, open_repository
from services.registry.service import RegistryService, RegistrySettings

KEY = "unit-enroll-key"
OPERATOR = Principal(subject="ops", is_operator=True)
PROFILE = DeviceProfile(train_memory_mb=1024, infer_memory_mb=0, gflops=5.0, up_mbps=5.0, down_mbps=10.0, tier="phone")


@pytest.fixture(params=["memory", "sqlite", "sqlite-buffered"])
def service(request, tmp_path):
    repo = InMemoryDeviceRepository() if request.param == "memory" else open_repository(
        f"sqlite:///{tmp_path / 'unit.db'}")
    if request.param == "sqlite-buffered":  # heartbeats write-behind, as the server runs them
        repo = LivenessBuffer(repo)
    svc = RegistryService(repo, RegistrySettings(liveness_window_s=30), clock=FakeClock())
    svc.enroll("default", KEY)
    yield svc
    repo.close()


def me(reg) -> Principal:
    return Principal(subject=reg.device_id, fleet="default")


def test_register_heartbeat_and_liveness(service):
    reg = service.register(KEY, "d1", PROFILE)
    device, _ = service.get_device(me(reg), reg.device_id)
    assert device.state is DeviceState.ONLINE and device.profile == PROFILE
    service.clock.advance(31)
    assert service.get_device(me(reg), reg.device_id)[0].state is DeviceState.OFFLINE
    assert service.sweep() == 1 and service.sweep() == 0
    assert service.device_counts()[(DeviceState.OFFLINE, "phone")] == 1
    assert service.heartbeat(me(reg), reg.device_id)[0] is DeviceState.ONLINE
    assert service.device_counts()[(DeviceState.ONLINE, "phone")] == 1


def test_profile_history(service):
    reg = service.register(KEY, "d1", PROFILE)
    assert service.update_profile(me(reg), reg.device_id, replace(PROFILE, tier="sbc")) == (2, True)
    assert service.update_profile(me(reg), reg.device_id, replace(PROFILE, tier="sbc")) == (2, False)
    device, history = service.get_device(me(reg), reg.device_id, include_history=True)
    assert device.tier == "sbc" and [h.profile.tier for h in history] == ["phone", "sbc"]
    assert service.list_devices(OPERATOR, tier="sbc").devices[0].device_id == reg.device_id


def test_reregistration_rules(service):
    reg = service.register(KEY, "d1", PROFILE)
    again = service.register(KEY, "d1", replace(PROFILE, gflops=6.0), device_token=reg.token)
    assert (again.device_id, again.created, again.profile_version) == (reg.device_id, False, 2)
    with pytest.raises(AlreadyExistsError):
        service.register(KEY, "d1", PROFILE)
    with pytest.raises(AuthenticationError):
        service.register("wrong", "d2", PROFILE)
    with pytest.raises(ValidationError):
        service.register(KEY, "d2", replace(PROFILE, gflops=-1))
    assert len(service.list_devices(OPERATOR).devices) == 1


def test_a_proposed_token_makes_a_first_registration_safe_to_repeat(service):
    token = "t" * 32  # the device's own choice (the agent draws it from secrets.token_urlsafe)
    first = service.register(KEY, "d1", PROFILE, device_token=token)
    assert (first.token, first.created) == (token, True)
    assert service.principal_for_token(token) == me(first)
    retry = service.register(KEY, "d1", PROFILE, device_token=token)  # the first reply was lost
    assert (retry.device_id, retry.token, retry.created) == (first.device_id, token, False)
    assert len(service.list_devices(OPERATOR).devices) == 1
    for weak in ("short", "s" * 31, "with space " * 4, "x" * 257, "é" * 40):
        with pytest.raises(ValidationError, match="device_token"):
            service.register(KEY, "d2", PROFILE, device_token=weak)
    assert len(service.list_devices(OPERATOR).devices) == 1
    # A token some device ever held is never issued again: after deregistration, the old token gets a fresh one.
    service.deregister(me(first), first.device_id)
    again = service.register(KEY, "d1", PROFILE, device_token=token)
    assert again.created and again.device_id != first.device_id and again.token != token
    assert service.principal_for_token(token) is None and service.principal_for_token(again.token) == me(again)


def test_a_repeated_registration_that_races_its_first_attempt_gets_the_same_device(service, monkeypatch):
    """The retry's name lookup runs before the first attempt commits; its insert then finds the name taken."""
    token = "r" * 40
    find = service.repo.find_active_by_name
    attempts: list = []

    def first_attempt_commits_after_lookup(fleet, name):
        found = find(fleet, name)
        if not attempts:
            monkeypatch.setattr(service.repo, "find_active_by_name", find)
            attempts.append(service.register(KEY, name, PROFILE, device_token=token))
        return found

    monkeypatch.setattr(service.repo, "find_active_by_name", first_attempt_commits_after_lookup)
    retry = service.register(KEY, "d1", PROFILE, device_token=token)
    assert attempts[0].created and not retry.created
    assert (retry.device_id, retry.token) == (attempts[0].device_id, token)
    with pytest.raises(AlreadyExistsError):  # a different device racing for the name still loses
        monkeypatch.setattr(service.repo, "find_active_by_name", lambda fleet, name: None)
        service.register(KEY, "d1", PROFILE, device_token="o" * 40)
    assert len(service.list_devices(OPERATOR).devices) == 1


def test_authorization_rules(service):
    a, b = service.register(KEY, "a", PROFILE), service.register(KEY, "b", PROFILE)
    with pytest.raises(PermissionDeniedError):
        service.heartbeat(me(a), b.device_id)
    with pytest.raises(PermissionDeniedError):
        service.list_devices(me(a))
    with pytest.raises(PermissionDeniedError):
        service.verify_token(me(a), b.token)
    assert service.verify_token(OPERATOR, b.token).device_id == b.device_id
    assert service.principal_for_token(a.token) == me(a)
    assert service.principal_for_token("rfm_nope") is None


def test_deregister(service):
    reg = service.register(KEY, "d1", PROFILE)
    service.deregister(me(reg), reg.device_id)
    assert service.principal_for_token(reg.token) is None
    with pytest.raises(NotFoundError):
        service.deregister(OPERATOR, reg.device_id)
    with pytest.raises(NotFoundError):
        service.update_profile(OPERATOR, reg.device_id, PROFILE)
    assert service.register(KEY, "d1", PROFILE).created


def test_pagination_visits_every_device_once(service):
    ids = {service.register(KEY, f"d{i}", PROFILE).device_id for i in range(11)}
    seen, token = [], ""
    while True:
        page = service.list_devices(OPERATOR, page_size=4, page_token=token)
        seen += [d.device_id for d in page.devices]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(ids)


def test_invalid_settings():
    with pytest.raises(ValidationError):
        RegistrySettings(liveness_window_s=0)
