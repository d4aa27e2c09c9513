"""A registry server on 127.0.0.1:0 in a background event loop, with sync stubs: for tests, benchmarks, and other
services' integration tests that need a live registry."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from raffm.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.auth import auth_metadata
from services.common.server import ServerConfig
from services.common.testing import FakeClock, LoopThread
from services.registry.app import RegistryApp, RegistryConfig, build_registry

ENROLL_KEY = "test-enroll-key-0123"
OPERATOR_TOKEN = "test-operator-token-0123"


def make_profile(**overrides: Any) -> common_pb2.DeviceProfile:
    """A plausible laptop profile; override any DeviceProfile field."""
    fields: dict[str, Any] = dict(train_memory_mb=8192, infer_memory_mb=4096, gflops=200.0, up_mbps=50.0,
                                  down_mbps=200.0, tier="laptop")
    fields.update(overrides)
    return common_pb2.DeviceProfile(**fields)


class RegistryHarness:
    """Start with ``start()``, stop with ``stop()``; ``stub`` is a sync RegistryServiceStub."""

    def __init__(
        self, db_url: str, *, liveness_window_s: float = 60.0, clock: FakeClock | None = None,
        server: ServerConfig | None = None, sweep_interval_s: float = 3600.0, metrics_port: int | None = None,
    ) -> None:
        self.clock = clock or FakeClock()
        self.metrics = CollectorRegistry()
        server = server or ServerConfig(grace_s=2.0)
        if metrics_port is not None:
            server = replace(server, metrics_port=metrics_port)
        self.config = RegistryConfig(
            db_url=db_url, enroll_key=ENROLL_KEY, operator_token=OPERATOR_TOKEN,
            liveness_window_s=liveness_window_s, sweep_interval_s=sweep_interval_s, server=server,
        )
        self.loop = LoopThread()
        self.app: RegistryApp | None = None
        self.channel: grpc.Channel | None = None
        self.stub: Any = None

    def start(self) -> RegistryHarness:
        async def build() -> RegistryApp:
            app = await build_registry(self.config, clock=self.clock, registry=self.metrics)
            await app.server.start()
            return app

        self.app = self.loop.run(build())
        self.channel = grpc.insecure_channel(self.address)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        return self

    @property
    def address(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.server.port}"

    @property
    def operator(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(OPERATOR_TOKEN)

    def register(self, name: str, **profile: Any) -> registry_pb2.RegisterReply:
        return self.stub.Register(
            registry_pb2.RegisterRequest(enroll_key=ENROLL_KEY, name=name, profile=make_profile(**profile)),
            timeout=30,
        )

    def sweep(self) -> int:
        assert self.app is not None
        return int(self.loop.run(self.app.sweeper.sweep_once()))

    def stop(self, grace_s: float | None = None) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.app is not None:
            self.loop.run(self.app.server.stop(grace_s))
            self.app = None
        self.loop.close()
