"""The RegistryService gRPC servicer: decode, run one use case in a worker thread, encode.

Authentication happened in the chassis interceptor (``current_principal()``); domain errors raised by the use cases
are mapped to status codes there too.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc

from raffm.profile import profile_from_proto
from raffm.v1 import registry_pb2, registry_pb2_grpc
from services.common.auth import Principal, current_principal, require_operator
from services.registry import codec
from services.registry.revocations import RevocationFeed
from services.registry.service import RegistryService

T = TypeVar("T")

SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]
PUBLIC_METHODS = frozenset({f"/{SERVICE.full_name}/Register"})


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self, service: RegistryService, executor: Executor | None = None,
        on_revoke: Callable[[str], None] = lambda device_id: None,
    ) -> None:
        self._service = service
        self._executor = executor
        self._on_revoke = on_revoke  # drops cached credentials of a deregistered device
        self.revocations = RevocationFeed()  # tells the other services

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Database work runs off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def Register(self, request: registry_pb2.RegisterRequest, context: grpc.aio.ServicerContext
                       ) -> registry_pb2.RegisterReply:
        reg = await self._run(self._service.register, request.enroll_key, request.name,
                              profile_from_proto(request.profile), request.device_token)
        settings = self._service.settings
        return registry_pb2.RegisterReply(
            device_id=reg.device_id, token=reg.token, created=reg.created, profile_version=reg.profile_version,
            heartbeat_interval_s=settings.heartbeat_interval_s, liveness_window_s=settings.liveness_window_s,
        )

    async def Heartbeat(self, request: registry_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
                        ) -> registry_pb2.HeartbeatReply:
        principal = current_principal()
        # A confirmed device's heartbeat is a dict update on the event loop (liveness.LivenessBuffer): no thread hop.
        beat = self._service.heartbeat_nowait(principal, request.device_id)
        state, now = beat if beat is not None else await self._run(self._service.heartbeat, principal,
                                                                   request.device_id)
        return registry_pb2.HeartbeatReply(state=codec.state_to_proto(state), server_time=codec.timestamp(now),
                                           next_heartbeat_s=self._service.settings.heartbeat_interval_s)

    async def UpdateProfile(self, request: registry_pb2.UpdateProfileRequest, context: grpc.aio.ServicerContext
                            ) -> registry_pb2.UpdateProfileReply:
        version, changed = await self._run(self._service.update_profile, current_principal(), request.device_id,
                                           profile_from_proto(request.profile))
        return registry_pb2.UpdateProfileReply(profile_version=version, changed=changed)

    async def GetDevice(self, request: registry_pb2.GetDeviceRequest, context: grpc.aio.ServicerContext
                        ) -> registry_pb2.GetDeviceReply:
        device, history = await self._run(self._service.get_device, current_principal(), request.device_id,
                                          request.include_history)
        return registry_pb2.GetDeviceReply(device=codec.device_to_proto(device),
                                           history=[codec.record_to_proto(r) for r in history])

    async def ListDevices(self, request: registry_pb2.ListDevicesRequest, context: grpc.aio.ServicerContext
                          ) -> registry_pb2.ListDevicesReply:
        page = await self._run(
            self._service.list_devices, current_principal(), state=codec.state_filter_from_proto(request.state),
            tier=request.tier, fleet=request.fleet, page_size=request.page_size, page_token=request.page_token,
        )
        return registry_pb2.ListDevicesReply(devices=[codec.device_to_proto(d) for d in page.devices],
                                             next_page_token=page.next_page_token)

    async def Deregister(self, request: registry_pb2.DeregisterRequest, context: grpc.aio.ServicerContext
                         ) -> registry_pb2.DeregisterReply:
        work = asyncio.ensure_future(self._run(self._service.deregister, current_principal(), request.device_id))

        def revoked(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._on_revoke(request.device_id)
                self.revocations.publish(request.device_id)

        # Shielded: a caller that gives up does not stop the revocation, nor its news to the caches and watchers.
        work.add_done_callback(revoked)
        await asyncio.shield(work)
        return registry_pb2.DeregisterReply()

    async def VerifyToken(self, request: registry_pb2.VerifyTokenRequest, context: grpc.aio.ServicerContext
                          ) -> registry_pb2.VerifyTokenReply:
        owner = await self._run(self._service.verify_token, current_principal(), request.token)
        return registry_pb2.VerifyTokenReply(device_id=owner.device_id, fleet=owner.fleet,
                                             state=codec.state_to_proto(owner.state), tier=owner.tier)

    async def WatchRevocations(self, request: registry_pb2.WatchRevocationsRequest, context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[registry_pb2.RevocationEvent]:
        require_operator(current_principal(), "WatchRevocations")
        async for device_id in self.revocations.watch():
            yield registry_pb2.RevocationEvent(synced=device_id is None, device_id=device_id or "")


class LocalTokenVerifier:
    """TokenVerifier for the registry itself: device tokens straight from its repository (revocation is immediate)."""

    def __init__(self, service: RegistryService, executor: Executor | None = None) -> None:
        self._service, self._executor = service, executor

    async def verify(self, token: str) -> Principal | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._service.principal_for_token, token)
