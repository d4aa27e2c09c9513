"""Where the aggregator learns a device's profile and liveness: the registry (gRPC) or a static table (tests)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from services.extractor.planner import Profile


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    profile: Profile
    online: bool = True

    @property
    def tier(self) -> str:
        return self.profile.tier


class DeviceDirectory(Protocol):
    async def get(self, device_id: str) -> DeviceInfo | None:
        """None when the registry does not know the device."""


class StaticDirectory:
    """A fixed table of devices."""

    def __init__(self, devices: Mapping[str, DeviceInfo]) -> None:
        self._devices = dict(devices)

    async def get(self, device_id: str) -> DeviceInfo | None:
        return self._devices.get(device_id)

    def set(self, info: DeviceInfo) -> None:
        self._devices[info.device_id] = info


class RegistryDirectory:
    """Asks the registry's GetDevice RPC with a service (operator) token."""

    def __init__(self, channel: Any, service_token: str, timeout_s: float = 5.0) -> None:
        from raffm.v1 import registry_pb2_grpc

        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {service_token}"),)
        self._timeout = timeout_s

    async def get(self, device_id: str) -> DeviceInfo | None:
        import grpc

        from raffm.v1 import registry_pb2

        try:
            reply = await self._stub.GetDevice(registry_pb2.GetDeviceRequest(device_id=device_id),
                                               metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        d = reply.device
        profile = Profile.from_proto(d.profile)
        if d.tier and profile.tier == "unknown":
            profile = Profile(**{**profile.__dict__, "tier": d.tier})
        return DeviceInfo(device_id=d.device_id, profile=profile, online=d.state == registry_pb2.DEVICE_STATE_ONLINE)
