"""Translation between raffm.v1 protobuf messages and registry domain objects. Pure."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from raffm.v1 import common_pb2, registry_pb2
from raffm.errors import ValidationError
from services.registry.domain import Device, DeviceState, Profile, ProfileRecord

_STATE_TO_PROTO: dict[DeviceState, registry_pb2.DeviceState] = {
    DeviceState.ONLINE: registry_pb2.DEVICE_STATE_ONLINE,
    DeviceState.OFFLINE: registry_pb2.DEVICE_STATE_OFFLINE,
    DeviceState.DEREGISTERED: registry_pb2.DEVICE_STATE_DEREGISTERED,
}
_STATE_FROM_PROTO: dict[int, DeviceState] = {int(v): k for k, v in _STATE_TO_PROTO.items()}


def state_to_proto(state: DeviceState) -> registry_pb2.DeviceState:
    return _STATE_TO_PROTO[state]


def state_filter_from_proto(value: int) -> DeviceState | None:
    """UNSPECIFIED -> None (any state but deregistered)."""
    if value == registry_pb2.DEVICE_STATE_UNSPECIFIED:
        return None
    try:
        return _STATE_FROM_PROTO[value]
    except KeyError:
        raise ValidationError(f"state {value} is not a DeviceState value", field="state") from None


def timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def profile_from_proto(msg: common_pb2.DeviceProfile) -> Profile:
    window = msg.availability if msg.HasField("availability") else None
    return Profile(
        train_memory_mb=msg.train_memory_mb,
        infer_memory_mb=msg.infer_memory_mb,
        gflops=msg.gflops,
        up_mbps=msg.up_mbps,
        down_mbps=msg.down_mbps,
        tier=msg.tier,
        battery_pct=msg.battery_pct if msg.HasField("battery_pct") else None,
        window_start_min=window.start_minute_utc if window is not None else None,
        window_end_min=window.end_minute_utc if window is not None else None,
    )


def profile_to_proto(profile: Profile) -> common_pb2.DeviceProfile:
    msg = common_pb2.DeviceProfile(
        train_memory_mb=profile.train_memory_mb, infer_memory_mb=profile.infer_memory_mb, gflops=profile.gflops,
        up_mbps=profile.up_mbps, down_mbps=profile.down_mbps, tier=profile.tier,
    )
    if profile.battery_pct is not None:
        msg.battery_pct = profile.battery_pct
    if profile.window_start_min is not None and profile.window_end_min is not None:
        msg.availability.start_minute_utc = profile.window_start_min
        msg.availability.end_minute_utc = profile.window_end_min
    return msg


def device_to_proto(device: Device) -> registry_pb2.Device:
    return registry_pb2.Device(
        device_id=device.device_id, name=device.name, fleet=device.fleet, state=state_to_proto(device.state),
        tier=device.tier, profile=profile_to_proto(device.profile), profile_version=device.profile_version,
        created_at=timestamp(device.created_at), last_seen=timestamp(device.last_seen),
    )


def record_to_proto(record: ProfileRecord) -> registry_pb2.ProfileRecord:
    return registry_pb2.ProfileRecord(version=record.version, profile=profile_to_proto(record.profile),
                                      recorded_at=timestamp(record.recorded_at))
