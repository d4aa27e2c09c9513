"""Bad input and bad credentials: the right status code, a message that says what to fix, and nothing written."""

from __future__ import annotations

import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from raffm.v1 import common_pb2, registry_pb2
from services.common.auth import auth_metadata
from services.registry.models import DeviceRow, ProfileRow, TokenRow
from services.registry.testing import ENROLL_KEY, make_profile

pb = registry_pb2
INVALID, UNAUTH, DENIED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                           grpc.StatusCode.PERMISSION_DENIED)


def table_counts(registry) -> tuple[int, int, int]:
    with registry.app.repo.engine.connect() as conn:
        return tuple(int(conn.execute(select(func.count()).select_from(m)).scalar_one())
                     for m in (DeviceRow, ProfileRow, TokenRow))


BAD_REGISTRATIONS = [
    # (case id, request overrides, profile overrides, expected code, text the message must contain)
    ("negative-train-memory", {}, {"train_memory_mb": -1}, INVALID, "train_memory_mb"),
    ("zero-train-memory", {}, {"train_memory_mb": 0}, INVALID, "train_memory_mb"),
    ("absurd-train-memory", {}, {"train_memory_mb": 10**12}, INVALID, "train_memory_mb"),
    ("negative-infer-memory", {}, {"infer_memory_mb": -2}, INVALID, "infer_memory_mb"),
    ("negative-gflops", {}, {"gflops": -3.0}, INVALID, "gflops"),
    ("nan-gflops", {}, {"gflops": math.nan}, INVALID, "gflops"),
    ("inf-up", {}, {"up_mbps": math.inf}, INVALID, "up_mbps"),
    ("zero-down", {}, {"down_mbps": 0.0}, INVALID, "down_mbps"),
    ("absurd-up", {}, {"up_mbps": 5e9}, INVALID, "up_mbps"),
    ("battery-over-100", {}, {"battery_pct": 150.0}, INVALID, "battery_pct"),
    ("window-out-of-day", {}, {"availability": common_pb2.AvailabilityWindow(start_minute_utc=0,
                                                                           end_minute_utc=1440)}, INVALID,
     "end_minute_utc"),
    ("unknown-tier", {}, {"tier": "mainframe"}, INVALID, "mainframe"),
    ("empty-tier", {}, {"tier": ""}, INVALID, "tier"),
    ("over-long-name", {"name": "x" * 129}, {}, INVALID, "129"),
    ("empty-name", {"name": ""}, {}, INVALID, "name"),
    ("control-char-name", {"name": "bad\nname"}, {}, INVALID, "name"),
    ("wrong-enroll-key", {"enroll_key": "not-the-key"}, {}, UNAUTH, "enroll_key"),
    ("missing-enroll-key", {"enroll_key": ""}, {}, UNAUTH, "enroll_key"),
]


@pytest.mark.parametrize("case", BAD_REGISTRATIONS, ids=[c[0] for c in BAD_REGISTRATIONS])
def test_bad_registration_is_rejected_and_nothing_written(registry, case):
    _, request_overrides, profile_overrides, code, needle = case
    fields = dict(enroll_key=ENROLL_KEY, name="dev", profile=make_profile(**profile_overrides))
    fields.update(request_overrides)
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.Register(pb.RegisterRequest(**fields), timeout=10)
    assert err.value.code() == code
    assert needle in err.value.details()
    assert table_counts(registry) == (0, 0, 0)


def test_bad_profile_update_keeps_the_current_profile(registry):
    r = registry.register("keep", train_memory_mb=4096)
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.UpdateProfile(pb.UpdateProfileRequest(
            device_id=r.device_id, profile=make_profile(train_memory_mb=-10)), metadata=auth_metadata(r.token))
    assert err.value.code() == INVALID and "train_memory_mb" in err.value.details()
    assert table_counts(registry) == (1, 1, 1)
    device = registry.stub.GetDevice(pb.GetDeviceRequest(device_id=r.device_id), metadata=auth_metadata(r.token))
    assert device.device.profile.train_memory_mb == 4096 and device.device.profile_version == 1


def test_bad_list_arguments(registry):
    for request, needle in ((pb.ListDevicesRequest(page_size=-1), "page_size"),
                            (pb.ListDevicesRequest(page_token="garbage!"), "page_token"),
                            (pb.ListDevicesRequest(tier="mainframe"), "tier")):
        with pytest.raises(grpc.RpcError) as err:
            registry.stub.ListDevices(request, metadata=registry.operator)
        assert err.value.code() == INVALID and needle in err.value.details()


def test_missing_and_wrong_tokens_are_unauthenticated(registry):
    r = registry.register("me")
    calls = [
        lambda md: registry.stub.Heartbeat(pb.HeartbeatRequest(device_id=r.device_id), metadata=md),
        lambda md: registry.stub.GetDevice(pb.GetDeviceRequest(device_id=r.device_id), metadata=md),
        lambda md: registry.stub.UpdateProfile(pb.UpdateProfileRequest(device_id=r.device_id,
                                                                       profile=make_profile()), metadata=md),
        lambda md: registry.stub.ListDevices(pb.ListDevicesRequest(), metadata=md),
        lambda md: registry.stub.Deregister(pb.DeregisterRequest(device_id=r.device_id), metadata=md),
        lambda md: registry.stub.VerifyToken(pb.VerifyTokenRequest(token=r.token), metadata=md),
    ]
    bad_metadata = [(), auth_metadata("rfm_wrong"), (("authorization", r.token),),  # no "Bearer" scheme
                    (("authorization", "Basic " + r.token),)]
    for call in calls:
        for md in bad_metadata:
            with pytest.raises(grpc.RpcError) as err:
                call(md)
            assert err.value.code() == UNAUTH, md
            assert "authorization: Bearer" in err.value.details() or "token" in err.value.details()
    assert table_counts(registry) == (1, 1, 1)


def test_another_devices_token_is_permission_denied(registry):
    a, b = registry.register("a"), registry.register("b")
    md = auth_metadata(a.token)
    for call in (
        lambda: registry.stub.Heartbeat(pb.HeartbeatRequest(device_id=b.device_id), metadata=md),
        lambda: registry.stub.GetDevice(pb.GetDeviceRequest(device_id=b.device_id), metadata=md),
        lambda: registry.stub.UpdateProfile(pb.UpdateProfileRequest(device_id=b.device_id,
                                                                    profile=make_profile(gflops=1.0)), metadata=md),
        lambda: registry.stub.Deregister(pb.DeregisterRequest(device_id=b.device_id), metadata=md),
        lambda: registry.stub.ListDevices(pb.ListDevicesRequest(), metadata=md),  # fleet-wide: operators only
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == DENIED
    # b is untouched.
    device = registry.stub.GetDevice(pb.GetDeviceRequest(device_id=b.device_id), metadata=registry.operator).device
    assert device.state == pb.DEVICE_STATE_ONLINE and device.profile_version == 1


def test_unknown_device_is_not_found_for_operators(registry):
    with pytest.raises(grpc.RpcError) as err:
        registry.stub.GetDevice(pb.GetDeviceRequest(device_id="0" * 32), metadata=registry.operator)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_need_no_token(registry):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(registry.channel)
    for service in ("", "raffm.v1.RegistryService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(registry.channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"raffm.v1.RegistryService", "grpc.health.v1.Health"} <= names
