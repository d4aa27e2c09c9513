import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from raffm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATE_UNSPECIFIED: _ClassVar[DeviceState]
    DEVICE_STATE_ONLINE: _ClassVar[DeviceState]
    DEVICE_STATE_OFFLINE: _ClassVar[DeviceState]
    DEVICE_STATE_DEREGISTERED: _ClassVar[DeviceState]
DEVICE_STATE_UNSPECIFIED: DeviceState
DEVICE_STATE_ONLINE: DeviceState
DEVICE_STATE_OFFLINE: DeviceState
DEVICE_STATE_DEREGISTERED: DeviceState

class Device(_message.Message):
    __slots__ = ("device_id", "name", "fleet", "state", "tier", "profile", "profile_version", "created_at", "last_seen")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    name: str
    fleet: str
    state: DeviceState
    tier: str
    profile: _common_pb2.DeviceProfile
    profile_version: int
    created_at: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    def __init__(self, device_id: _Optional[str] = ..., name: _Optional[str] = ..., fleet: _Optional[str] = ..., state: _Optional[_Union[DeviceState, str]] = ..., tier: _Optional[str] = ..., profile: _Optional[_Union[_common_pb2.DeviceProfile, _Mapping]] = ..., profile_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ProfileRecord(_message.Message):
    __slots__ = ("version", "profile", "recorded_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    version: int
    profile: _common_pb2.DeviceProfile
    recorded_at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[int] = ..., profile: _Optional[_Union[_common_pb2.DeviceProfile, _Mapping]] = ..., recorded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("enroll_key", "name", "profile", "device_token")
    ENROLL_KEY_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    enroll_key: str
    name: str
    profile: _common_pb2.DeviceProfile
    device_token: str
    def __init__(self, enroll_key: _Optional[str] = ..., name: _Optional[str] = ..., profile: _Optional[_Union[_common_pb2.DeviceProfile, _Mapping]] = ..., device_token: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("device_id", "token", "created", "heartbeat_interval_s", "liveness_window_s", "profile_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LIVENESS_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    token: str
    created: bool
    heartbeat_interval_s: float
    liveness_window_s: float
    profile_version: int
    def __init__(self, device_id: _Optional[str] = ..., token: _Optional[str] = ..., created: _Optional[bool] = ..., heartbeat_interval_s: _Optional[float] = ..., liveness_window_s: _Optional[float] = ..., profile_version: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("state", "server_time", "next_heartbeat_s")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    state: DeviceState
    server_time: _timestamp_pb2.Timestamp
    next_heartbeat_s: float
    def __init__(self, state: _Optional[_Union[DeviceState, str]] = ..., server_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_heartbeat_s: _Optional[float] = ...) -> None: ...

class UpdateProfileRequest(_message.Message):
    __slots__ = ("device_id", "profile")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    profile: _common_pb2.DeviceProfile
    def __init__(self, device_id: _Optional[str] = ..., profile: _Optional[_Union[_common_pb2.DeviceProfile, _Mapping]] = ...) -> None: ...

class UpdateProfileReply(_message.Message):
    __slots__ = ("profile_version", "changed")
    PROFILE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    profile_version: int
    changed: bool
    def __init__(self, profile_version: _Optional[int] = ..., changed: _Optional[bool] = ...) -> None: ...

class GetDeviceRequest(_message.Message):
    __slots__ = ("device_id", "include_history")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    include_history: bool
    def __init__(self, device_id: _Optional[str] = ..., include_history: _Optional[bool] = ...) -> None: ...

class GetDeviceReply(_message.Message):
    __slots__ = ("device", "history")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    device: Device
    history: _containers.RepeatedCompositeFieldContainer[ProfileRecord]
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., history: _Optional[_Iterable[_Union[ProfileRecord, _Mapping]]] = ...) -> None: ...

class ListDevicesRequest(_message.Message):
    __slots__ = ("state", "tier", "page_size", "page_token", "fleet")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    state: DeviceState
    tier: str
    page_size: int
    page_token: str
    fleet: str
    def __init__(self, state: _Optional[_Union[DeviceState, str]] = ..., tier: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., fleet: _Optional[str] = ...) -> None: ...

class ListDevicesReply(_message.Message):
    __slots__ = ("devices", "next_page_token")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    next_page_token: str
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class DeregisterReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class VerifyTokenReply(_message.Message):
    __slots__ = ("device_id", "fleet", "state", "tier")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    FLEET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    fleet: str
    state: DeviceState
    tier: str
    def __init__(self, device_id: _Optional[str] = ..., fleet: _Optional[str] = ..., state: _Optional[_Union[DeviceState, str]] = ..., tier: _Optional[str] = ...) -> None: ...

class WatchRevocationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevocationEvent(_message.Message):
    __slots__ = ("synced", "device_id")
    SYNCED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    synced: bool
    device_id: str
    def __init__(self, synced: _Optional[bool] = ..., device_id: _Optional[str] = ...) -> None: ...
