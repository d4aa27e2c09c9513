"""200 devices registering at the same time through gRPC: exactly 200 rows, no duplicates, no errors."""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import func, select

from raffm.v1 import registry_pb2
from services.registry.models import DeviceRow, ProfileRow, TokenRow
from services.registry.testing import ENROLL_KEY, make_profile

N = 200
TIERS = ("phone", "sbc", "jetson", "laptop", "desktop", "server")


def test_200_concurrent_registrations(registry):
    requests = [registry_pb2.RegisterRequest(enroll_key=ENROLL_KEY, name=f"edge-{i:03d}",
                                             profile=make_profile(tier=TIERS[i % len(TIERS)], gflops=1.0 + i))
                for i in range(N)]
    futures = [registry.stub.Register.future(r, timeout=60) for r in requests]  # all in flight before any wait
    replies = [f.result() for f in futures]
    assert all(r.created for r in replies)
    assert len({r.device_id for r in replies}) == N and len({r.token for r in replies}) == N
    with registry.app.repo.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DeviceRow)).scalar_one() == N
        assert conn.execute(select(func.count(func.distinct(DeviceRow.name)))).scalar_one() == N
        assert conn.execute(select(func.count()).select_from(ProfileRow)).scalar_one() == N
        assert conn.execute(select(func.count()).select_from(TokenRow)).scalar_one() == N
    listed = registry.stub.ListDevices(registry_pb2.ListDevicesRequest(page_size=1000), metadata=registry.operator)
    assert sorted(d.name for d in listed.devices) == [f"edge-{i:03d}" for i in range(N)]
    assert {d.profile.gflops for d in listed.devices} == {1.0 + i for i in range(N)}


def test_concurrent_registrations_of_one_name_create_one_device(registry):
    request = registry_pb2.RegisterRequest(enroll_key=ENROLL_KEY, name="twin", profile=make_profile())
    futures = [registry.stub.Register.future(request, timeout=60) for _ in range(20)]
    created, refused = 0, 0
    for f in futures:
        try:
            created += f.result().created
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.ALREADY_EXISTS, exc
            refused += 1
    assert (created, refused) == (1, 19)
    with registry.app.repo.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(DeviceRow)).scalar_one() == 1


pytestmark = pytest.mark.timeout(120)
