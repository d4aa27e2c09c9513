"""The registry over real gRPC (127.0.0.1:0), on SQLite and, when configured, PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import func, select

from raffm.v1 import common_pb2, registry_pb2
from services.common.auth import auth_metadata
from services.common.errors import parse_error_detail
from services.registry.models import DeviceRow, ProfileRow, TokenRow
from services.registry.testing import ENROLL_KEY, make_profile

pb = registry_pb2


def rows(registry, model) -> int:
    """Rows of one table, read straight from the database the server uses."""
    with registry.app.repo.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def get(registry, device_id, token, include_history=False):
    return registry.stub.GetDevice(pb.GetDeviceRequest(device_id=device_id, include_history=include_history),
                                   metadata=auth_metadata(token), timeout=10)


def list_all(registry, **filters):
    """Every device through ListDevices pagination, plus the number of pages."""
    devices, token, pages = [], "", 0
    while True:
        reply = registry.stub.ListDevices(pb.ListDevicesRequest(page_token=token, **filters),
                                          metadata=registry.operator, timeout=10)
        devices.extend(reply.devices)
        pages += 1
        token = reply.next_page_token
        if not token:
            return devices, pages


def test_register_then_get_returns_the_profile_and_online_state(registry):
    reply = registry.register("pi-kitchen", tier="sbc", train_memory_mb=2048, infer_memory_mb=0, gflops=12.5,
                              battery_pct=80.0)
    assert reply.created and reply.token.startswith("rfm_") and reply.profile_version == 1
    assert reply.liveness_window_s == 60.0 and reply.heartbeat_interval_s == 20.0
    device = get(registry, reply.device_id, reply.token).device
    assert (device.name, device.tier, device.fleet) == ("pi-kitchen", "sbc", "default")
    assert device.state == pb.DEVICE_STATE_ONLINE
    assert device.profile.train_memory_mb == 2048 and device.profile.gflops == 12.5
    assert device.profile.HasField("battery_pct") and device.profile.battery_pct == 80.0
    assert not device.profile.HasField("availability")
    # Tokens are stored hashed: the plaintext appears nowhere in the table.
    with registry.app.repo.engine.connect() as conn:
        stored = conn.execute(select(TokenRow.token_hash)).scalars().all()
    assert stored and reply.token not in stored


def test_heartbeat_liveness_window_marks_offline_and_heartbeat_brings_back(registry):
    a = registry.register("a")
    b = registry.register("b")
    registry.clock.advance(45)
    hb = registry.stub.Heartbeat(pb.HeartbeatRequest(device_id=a.device_id), metadata=auth_metadata(a.token))
    assert hb.state == pb.DEVICE_STATE_ONLINE and hb.next_heartbeat_s == 20.0
    registry.clock.advance(30)  # b silent for 75 s > 60 s window; a for 30 s
    assert get(registry, b.device_id, b.token).device.state == pb.DEVICE_STATE_OFFLINE
    assert get(registry, a.device_id, a.token).device.state == pb.DEVICE_STATE_ONLINE
    offline, _ = list_all(registry, state=pb.DEVICE_STATE_OFFLINE)
    online, _ = list_all(registry, state=pb.DEVICE_STATE_ONLINE)
    assert [d.name for d in offline] == ["b"] and [d.name for d in online] == ["a"]
    # The sweeper persists it and the gauge reports it.
    assert registry.sweep() == 1
    assert registry.metrics.get_sample_value("raffm_registry_devices", {"state": "offline", "tier": "laptop"}) == 1
    assert registry.metrics.get_sample_value("raffm_registry_devices", {"state": "online", "tier": "laptop"}) == 1
    # Coming back.
    hb = registry.stub.Heartbeat(pb.HeartbeatRequest(device_id=b.device_id), metadata=auth_metadata(b.token))
    assert hb.state == pb.DEVICE_STATE_ONLINE
    assert get(registry, b.device_id, b.token).device.state == pb.DEVICE_STATE_ONLINE
    registry.sweep()
    assert registry.metrics.get_sample_value("raffm_registry_devices", {"state": "online", "tier": "laptop"}) == 2


def test_update_profile_keeps_history_and_skips_unchanged(registry):
    r = registry.register("jetson-1", tier="jetson", train_memory_mb=4096)
    md = auth_metadata(r.token)
    registry.clock.advance(5)
    up = registry.stub.UpdateProfile(pb.UpdateProfileRequest(
        device_id=r.device_id, profile=make_profile(tier="jetson", train_memory_mb=3000)), metadata=md)
    assert (up.profile_version, up.changed) == (2, True)
    same = registry.stub.UpdateProfile(pb.UpdateProfileRequest(
        device_id=r.device_id, profile=make_profile(tier="jetson", train_memory_mb=3000)), metadata=md)
    assert (same.profile_version, same.changed) == (2, False)
    reply = get(registry, r.device_id, r.token, include_history=True)
    assert reply.device.profile.train_memory_mb == 3000 and reply.device.profile_version == 2
    assert [(h.version, h.profile.train_memory_mb) for h in reply.history] == [(1, 4096), (2, 3000)]
    assert reply.history[1].recorded_at.ToSeconds() - reply.history[0].recorded_at.ToSeconds() == 5
    assert not get(registry, r.device_id, r.token).history  # history only on request


def test_reregister_with_token_updates_profile_instead_of_duplicating(registry):
    first = registry.register("phone-7", tier="phone", train_memory_mb=1024)
    again = registry.stub.Register(pb.RegisterRequest(
        enroll_key=ENROLL_KEY, name="phone-7", profile=make_profile(tier="phone", train_memory_mb=1500),
        device_token=first.token))
    assert (again.device_id, again.token, again.created, again.profile_version) == (
        first.device_id, first.token, False, 2)
    assert rows(registry, DeviceRow) == 1 and rows(registry, ProfileRow) == 2 and rows(registry, TokenRow) == 1
    assert get(registry, first.device_id, first.token).device.profile.train_memory_mb == 1500
    # Same name without (or with a foreign) token: refused, nothing written.
    other = registry.register("other")
    for token in ("", other.token, "rfm_forged"):
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.Register(pb.RegisterRequest(enroll_key=ENROLL_KEY, name="phone-7",
                                                      profile=make_profile(tier="phone"), device_token=token))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "phone-7" in err.value.details()
    assert rows(registry, DeviceRow) == 2 and rows(registry, ProfileRow) == 3


def test_list_devices_paginates_and_filters(registry):
    tiers = ["phone", "sbc", "laptop", "server", "phone", "sbc", "phone"]
    ids = {registry.register(f"dev-{i}", tier=t).device_id: t for i, t in enumerate(tiers)}
    devices, pages = list_all(registry, page_size=3)
    assert pages == 3 and len(devices) == 7
    assert [d.device_id for d in devices] == sorted(ids)  # stable order by id, no duplicates, nothing missing
    phones, _ = list_all(registry, tier="phone", page_size=2)
    assert sorted(d.device_id for d in phones) == sorted(k for k, t in ids.items() if t == "phone")
    empty = registry.stub.ListDevices(pb.ListDevicesRequest(tier="desktop"), metadata=registry.operator)
    assert not empty.devices and not empty.next_page_token
    one = registry.stub.ListDevices(pb.ListDevicesRequest(page_size=1, fleet="default"), metadata=registry.operator)
    assert len(one.devices) == 1 and one.next_page_token
    none = registry.stub.ListDevices(pb.ListDevicesRequest(fleet="elsewhere"), metadata=registry.operator)
    assert not none.devices


def test_deregister_revokes_token_and_frees_the_name(registry):
    r = registry.register("leaving")
    md = auth_metadata(r.token)
    registry.stub.Deregister(pb.DeregisterRequest(device_id=r.device_id), metadata=md)
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.Heartbeat(pb.HeartbeatRequest(device_id=r.device_id), metadata=md)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    gone = registry.stub.GetDevice(pb.GetDeviceRequest(device_id=r.device_id), metadata=registry.operator).device
    assert gone.state == pb.DEVICE_STATE_DEREGISTERED
    assert not list_all(registry)[0]  # default listing hides deregistered devices
    assert [d.device_id for d in list_all(registry, state=pb.DEVICE_STATE_DEREGISTERED)[0]] == [r.device_id]
    again = registry.register("leaving")
    assert again.created and again.device_id != r.device_id
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.Deregister(pb.DeregisterRequest(device_id=r.device_id), metadata=registry.operator)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_agent_whose_registration_reply_is_lost_retries_into_the_same_device(registry, tmp_path, monkeypatch):
    """The registry commits the device, then answers after the agent's deadline; the agent's retry must get that
    device (it proposed its own token), not ALREADY_EXISTS."""
    import time

    from edge_agent.client import ServiceClient, Stopper
    from edge_agent.config import AgentConfig
    from edge_agent.identity import Identity
    from edge_agent.state import AgentState, load_state
    from raffm.profile import DeviceProfile

    create = registry.app.service.repo.create_device

    def commit_then_answer_late(*args, **kwargs):
        create(*args, **kwargs)
        time.sleep(1.0)

    monkeypatch.setattr(registry.app.service.repo, "create_device", commit_then_answer_late)
    config = AgentConfig(enroll_key=ENROLL_KEY, name="slow-reply", state_dir=str(tmp_path), registry=registry.address,
                         memory_mb=1024, gflops=5.0, up_mbps=5.0, down_mbps=10.0, rpc_timeout_s=0.4,
                         backoff_initial_s=0.05, backoff_max_s=0.2).validate()
    client = ServiceClient(config, Stopper())
    profile = DeviceProfile(train_memory_mb=1024, infer_memory_mb=0, gflops=5.0, up_mbps=5.0, down_mbps=10.0,
                            tier="phone")
    state = Identity(client, AgentState()).ensure_registered(profile)
    assert client.retries >= 1  # the first attempt did time out
    devices = list_all(registry)[0]
    assert [(d.device_id, d.name) for d in devices] == [(state.device_id, "slow-reply")]
    assert load_state(tmp_path) == state and get(registry, state.device_id, state.token).device.name == "slow-reply"


def test_verify_token_for_other_services(registry):
    r = registry.register("verify-me", tier="server")
    reply = registry.stub.VerifyToken(pb.VerifyTokenRequest(token=r.token), metadata=registry.operator)
    assert (reply.device_id, reply.fleet, reply.tier, reply.state) == (
        r.device_id, "default", "server", pb.DEVICE_STATE_ONLINE)
    for token in ("rfm_unknown", ""):
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.VerifyToken(pb.VerifyTokenRequest(token=token), metadata=registry.operator)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:  # devices cannot probe other tokens
        registry.stub.VerifyToken(pb.VerifyTokenRequest(token=r.token), metadata=auth_metadata(r.token))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_remote_verifier_resolves_device_tokens_through_the_registry(registry):
    from services.common.auth import CachingTokenVerifier, RemoteRegistryVerifier
    from services.registry.testing import OPERATOR_TOKEN

    r = registry.register("remote")

    async def scenario():
        async with grpc.aio.insecure_channel(registry.address) as channel:
            verifier = CachingTokenVerifier(RemoteRegistryVerifier(channel, OPERATOR_TOKEN))
            return await verifier.verify(r.token), await verifier.verify("rfm_nope")

    principal, unknown = registry.loop.run(scenario())
    assert principal.device_id == r.device_id and principal.fleet == "default" and unknown is None


@pytest.mark.parametrize("registry_state", ["down", "silent"])
@pytest.mark.parametrize("lookup", ["token", "device"])
def test_registry_clients_ask_for_a_retry_when_the_registry_does_not_answer(registry, registry_state, lookup):
    """A registry that is down, or too busy to answer within the deadline, is a transient state: the device's call
    (a token check, or the aggregator's lookup of the polling device) fails UNAVAILABLE (its agent retries with
    backoff), not INTERNAL (which it takes for a server bug)."""
    import socket

    from raffm.errors import UnavailableError
    from services.aggregator.devices import RegistryDirectory
    from services.common.auth import RemoteRegistryVerifier
    from services.registry.testing import OPERATOR_TOKEN

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if registry_state == "silent":
            sock.listen()  # connections complete in the kernel's backlog; nothing ever answers them

        async def scenario():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{sock.getsockname()[1]}") as channel:
                if lookup == "token":
                    await RemoteRegistryVerifier(channel, OPERATOR_TOKEN, timeout_s=1.0).verify("rfm_any")
                else:
                    await RegistryDirectory(channel, OPERATOR_TOKEN, timeout_s=1.0).get("any-device")

        what = "check this token" if lookup == "token" else "look this device up"
        with pytest.raises(UnavailableError, match=f"registry could not {what}"):
            registry.loop.run(scenario())


def test_error_detail_names_the_field(registry):
    with pytest.raises(grpc.RpcError) as err:
        registry.register("bad", train_memory_mb=-5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = parse_error_detail(err.value.trailing_metadata())
    assert isinstance(detail, common_pb2.ErrorDetail)
    assert (detail.reason, detail.field) == ("ValidationError", "profile.train_memory_mb")
    assert "-5" in detail.message and detail.hint
