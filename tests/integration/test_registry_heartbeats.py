"""Write-behind heartbeats over real gRPC: fresh reads before the flush, everything in SQL after a graceful stop."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from sqlalchemy import create_engine, select

from raffm.v1 import registry_pb2
from services.common.auth import auth_metadata
from services.registry.models import DeviceRow
from services.registry.testing import RegistryHarness

pb = registry_pb2


def stored_last_seen(url: str, device_id: str) -> datetime:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(DeviceRow.last_seen).where(DeviceRow.id == device_id)).scalar_one()
    finally:
        engine.dispose()


def test_heartbeats_are_read_fresh_and_flushed_at_shutdown(sql_url: str) -> None:
    harness = RegistryHarness(sql_url)
    harness.config = replace(harness.config, heartbeat_flush_s=3600)  # only the shutdown flushes
    harness.start()
    try:
        assert harness.app is not None and harness.app.liveness is not None
        reg = harness.register("pi-1")
        md = auth_metadata(reg.token)
        harness.stub.Heartbeat(pb.HeartbeatRequest(device_id=reg.device_id), metadata=md, timeout=10)  # confirms
        first = harness.clock()
        harness.clock.advance(80)  # past the 60 s window of the first beat: offline, unless the second one counts
        reply = harness.stub.Heartbeat(pb.HeartbeatRequest(device_id=reg.device_id), metadata=md, timeout=10)
        assert reply.state == pb.DEVICE_STATE_ONLINE
        device = harness.stub.GetDevice(pb.GetDeviceRequest(device_id=reg.device_id), metadata=md, timeout=10).device
        assert device.state == pb.DEVICE_STATE_ONLINE
        assert device.last_seen.ToDatetime() == harness.clock().replace(tzinfo=None)
        assert harness.sweep() == 0  # the sweep flushed first
        assert stored_last_seen(sql_url, reg.device_id).replace(tzinfo=None) == harness.clock().replace(tzinfo=None)
        harness.clock.advance(5)
        harness.stub.Heartbeat(pb.HeartbeatRequest(device_id=reg.device_id), metadata=md, timeout=10)
        assert harness.app.liveness.pending() == 1
        assert stored_last_seen(sql_url, reg.device_id).replace(tzinfo=None) == (first.replace(tzinfo=None)
                                                                                + timedelta(seconds=80))
    finally:
        harness.stop(grace_s=1.0)
    assert stored_last_seen(sql_url, reg.device_id).replace(tzinfo=None) == harness.clock().replace(tzinfo=None)
