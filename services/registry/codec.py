"""Translation between raffm.v1 registry messages and registry domain objects (profiles: :mod:`raffm.proto`). Pure."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from raffm.errors import ValidationError
from raffm.profile import profile_to_proto
from raffm.v1 import registry_pb2
from services.registry.domain import Device, DeviceState, ProfileRecord

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


def device_to_proto(device: Device) -> registry_pb2.Device:
    return registry_pb2.Device(
        device_id=device.device_id, name=device.name, fleet=device.fleet, state=state_to_proto(device.state),
        tier=device.tier, profile=profile_to_proto(device.profile), profile_version=device.profile_version,
        created_at=timestamp(device.created_at), last_seen=timestamp(device.last_seen),
    )


def record_to_proto(record: ProfileRecord) -> registry_pb2.ProfileRecord:
    return registry_pb2.ProfileRecord(version=record.version, profile=profile_to_proto(record.profile),
                                      recorded_at=timestamp(record.recorded_at))
