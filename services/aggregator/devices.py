"""Where the aggregator learns a device's profile and liveness: the registry (gRPC) or a static table (tests).

``CachingDirectory`` wraps either and remembers each answer briefly, so a fleet polling every few seconds costs the
registry one GetDevice per device per TTL, while a device that goes offline or is deregistered stops getting
assignments within that TTL.
"""

from __future__ import annotations

import asyncio
import builtins
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from raffm.profile import UNKNOWN_TIER, DeviceProfile, profile_from_proto

ONLINE, OFFLINE, DEREGISTERED = "online", "offline", "deregistered"


@dataclass(frozen=True)
class DeviceInfo:
    device_id: str
    profile: DeviceProfile
    online: bool = True
    state: str = ""  # online | offline | deregistered (derived from ``online`` when empty)

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", ONLINE if self.online else OFFLINE)
        object.__setattr__(self, "online", self.state == ONLINE)

    @property
    def tier(self) -> str:
        return self.profile.tier


class DeviceDirectory(Protocol):
    async def get(self, device_id: str) -> DeviceInfo | None:
        """None when the registry does not know the device."""

    async def online_ids(self) -> set[str] | None:
        """Every device online now (None when that cannot be known): who may still take part in a round."""


class StaticDirectory:
    """A fixed table of devices."""

    def __init__(self, devices: Mapping[str, DeviceInfo]) -> None:
        self._devices = dict(devices)

    async def get(self, device_id: str) -> DeviceInfo | None:
        return self._devices.get(device_id)

    def set(self, info: DeviceInfo) -> None:
        self._devices[info.device_id] = info

    async def online_ids(self) -> builtins.set[str] | None:  # (the method `set` shadows the builtin here)
        return {d.device_id for d in self._devices.values() if d.online}


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
        from services.common.errors import busy

        try:
            reply = await self._stub.GetDevice(registry_pb2.GetDeviceRequest(device_id=device_id),
                                               metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if (error := busy(exc, "the registry could not look this device up")) is not None:
                raise error from None  # the device polls again
            raise
        d = reply.device
        profile = profile_from_proto(d.profile)
        if not profile.tier:
            profile = replace(profile, tier=d.tier or UNKNOWN_TIER)
        state = {registry_pb2.DEVICE_STATE_ONLINE: ONLINE,
                 registry_pb2.DEVICE_STATE_DEREGISTERED: DEREGISTERED}.get(d.state, OFFLINE)
        return DeviceInfo(device_id=d.device_id, profile=profile, state=state)

    async def online_ids(self) -> set[str] | None:
        import grpc

        from raffm.v1 import registry_pb2

        ids: set[str] = set()
        token = ""
        try:
            while True:
                reply = await self._stub.ListDevices(
                    registry_pb2.ListDevicesRequest(state=registry_pb2.DEVICE_STATE_ONLINE, page_size=1000,
                                                    page_token=token), metadata=self._metadata, timeout=self._timeout)
                ids.update(d.device_id for d in reply.devices)
                token = reply.next_page_token
                if not token:
                    return ids
        except grpc.aio.AioRpcError:
            return None  # unknown: rounds then wait for their deadline, as without this answer


class CachingDirectory:
    """Remembers a directory's answers (unknown devices included) for ``ttl_s``; bounded LRU of ``max_entries``."""

    def __init__(self, inner: DeviceDirectory, ttl_s: float = 2.0, *, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner, self.ttl_s, self.max_entries, self._clock = inner, ttl_s, max_entries, clock
        self._cache: OrderedDict[str, tuple[float, DeviceInfo | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[DeviceInfo | None]] = {}
        self.lookups = 0  # calls that reached the inner directory

    async def get(self, device_id: str) -> DeviceInfo | None:
        hit = self._cache.get(device_id)
        if hit is not None and self._clock() - hit[0] < self.ttl_s:
            self._cache.move_to_end(device_id)
            return hit[1]
        pending = self._inflight.get(device_id)
        if pending is not None:  # one registry call per device at a time, however many polls arrive
            return await asyncio.shield(pending)
        future: asyncio.Future[DeviceInfo | None] = asyncio.get_running_loop().create_future()
        self._inflight[device_id] = future
        try:
            self.lookups += 1
            info = await self.inner.get(device_id)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._inflight.pop(device_id, None)
        future.set_result(info)
        self._cache[device_id] = (self._clock(), info)
        self._cache.move_to_end(device_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return info

    async def online_ids(self) -> set[str] | None:
        return await self.inner.online_ids()  # asked rarely (when a round may be stalled): never cached

    def invalidate(self, device_id: str | None = None) -> None:
        if device_id is None:
            self._cache.clear()
        else:
            self._cache.pop(device_id, None)
