"""The gRPC server builder: one place that sets limits, keepalive, health, reflection, auth, metrics and shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from raffm.errors import ConfigError
from raffm.lifeline import watch_parent
from services.common.auth import FleetVerifier, TokenVerifier
from services.common.interceptors import ChassisInterceptor
from services.common.metrics import MetricsServer, RpcMetrics, build_rpc_metrics, start_metrics_server
from services.common.tls import TlsFiles, check_transport, server_credentials

if TYPE_CHECKING:  # the registry serves through this module and never loads torch, which raffm.chunkwire's wire does
    from raffm.chunkwire import ChunkCodec

log = logging.getLogger(__name__)

MiB = 1 << 20
# What stops a service gracefully: SIGTERM (schedulers, `timeout`, containers), SIGINT (Ctrl-C), SIGHUP (its terminal
# went away).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Weight chunks are ~1 MiB; the default 4 MiB limit counts protobuf framing, so set it explicitly and roomy.
DEFAULT_MAX_MESSAGE_BYTES = 64 * MiB
# How much of one stream's data the transport may buffer before the service reads it. gRPC's default grows this
# window with its bandwidth-delay estimate, without bound in practice: 32 concurrent BERT-base uploads held 1.9 GB
# of receive buffers in the aggregator (bench/results/2026-11-30-transfer.md). A fixed window bounds the memory of
# N concurrent uploads to about N x window, whatever the model's size; one stream's throughput is at most
# window / round-trip time (4 MiB at 50 ms: 80 MB/s, above the links of the devices it serves).
DEFAULT_STREAM_WINDOW_BYTES = 4 * MiB
MIN_STREAM_WINDOW_BYTES = 65_535  # HTTP/2's initial window


@dataclass(frozen=True)
class ServerConfig:
    """Transport settings shared by every service (see ``services.common.cli_args``)."""

    host: str = "127.0.0.1"
    port: int = 0
    tls: TlsFiles | None = None
    insecure: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    stream_window_bytes: int = DEFAULT_STREAM_WINDOW_BYTES
    grace_s: float = 10.0
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # None: no /metrics endpoint; 0: a free port.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Once serving, the bound ports go here as JSON ({"grpc": ..., "metrics": ... or null}): how a caller that
    # started the service on port 0 learns where it listens, with no window in which another process takes the port.
    port_file: str | None = None


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to mount: its full name, how to add it, and which of its methods need no token."""

    name: str
    add_to_server: Callable[[grpc.aio.Server], None]
    public_methods: frozenset[str] = field(default_factory=frozenset)


_HANDLERS = {  # (client streaming, server streaming) -> grpc's handler constructor
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}


def bind(service: ServiceDescriptor, servicer: Any, *, codecs: Mapping[str, ChunkCodec] | None = None,
         public_methods: frozenset[str] = frozenset()) -> ServiceBinding:
    """``servicer``'s methods as the generated ``add_*Servicer_to_server`` mounts them, except that a method named in
    ``codecs`` reads or writes its chunk messages through that codec (:mod:`raffm.chunkwire`: the same bytes,
    fewer copies)."""
    handlers = {}
    for method in service.methods:
        request, response = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        codec = (codecs or {}).get(method.name)
        handlers[method.name] = _HANDLERS[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=codec.deserialize if codec and codec.message_type is request else request.FromString,
            response_serializer=(codec.serialize if codec and codec.message_type is response
                                 else response.SerializeToString))

    def add(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)

    return ServiceBinding(service.full_name, add, public_methods)


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Channel arguments: explicit message limits, a fixed receive window per stream, keepalive, and no silent port
    sharing."""
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.stream_window_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client keepalive pings down to every 10 s without counting them as abuse.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


class ChassisServer:
    """A built (not yet started) service: ``await start()``, then ``await stop()`` or ``await serve_until_signal()``."""

    def __init__(
        self, server: grpc.aio.Server, port: int, health: health_aio.HealthServicer, service_names: Sequence[str],
        config: ServerConfig, registry: CollectorRegistry, rpc_metrics: RpcMetrics,
    ) -> None:
        self.server, self.port, self.health, self.config = server, port, health, config
        self.registry, self.rpc_metrics = registry, rpc_metrics
        self.service_names = tuple(service_names)
        self.metrics_server: MetricsServer | None = None
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_drain: list[Callable[[], None]] = []
        self._stopped = asyncio.Event()

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None

    def on_start(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` once the server is listening (e.g. start background tasks)."""
        self._on_start.append(hook)

    def on_stop(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` after the server drained (e.g. stop background tasks, dispose the database engine)."""
        self._on_stop.append(hook)

    def on_drain(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when stopping, before in-flight calls are waited for (e.g. end streams that never end by
        themselves, which would otherwise hold the stop for the whole grace period)."""
        self._on_drain.append(hook)

    async def start(self) -> None:
        await self.server.start()
        for hook in self._on_start:
            await hook()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port is not None:
            self.metrics_server = start_metrics_server(self.registry, self.config.metrics_port,
                                                       self.config.metrics_host)
        if self.config.port_file:  # written whole, then renamed: a reader never sees half of it
            tmp = f"{self.config.port_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({"grpc": self.port, "metrics": self.metrics_port}, f)
            os.replace(tmp, self.config.port_file)
        log.info("serving %s on %s%s", ", ".join(self.service_names), self.address,
                 f", metrics on {self.config.metrics_host}:{self.metrics_port}" if self.metrics_server else "")

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish within the grace period, run hooks."""
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace))  # new calls are refused from here on
        await asyncio.sleep(0)
        for drain in self._on_drain:
            drain()
        await stopping
        for hook in reversed(self._on_stop):
            try:
                await hook()
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("shutdown hook failed")
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._stopped.set()
        log.info("stopped %s", self.address)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def serve_until_signal(self, signals: Sequence[signal.Signals] = STOP_SIGNALS) -> None:
        """Start, block until SIGTERM/SIGINT/SIGHUP (or until the parent process that started this one is gone, see
        :mod:`raffm.lifeline`), then stop gracefully."""
        loop = asyncio.get_running_loop()
        requested = asyncio.Event()
        for sig in signals:
            loop.add_signal_handler(sig, requested.set)

        def parent_lost() -> None:
            try:
                loop.call_soon_threadsafe(requested.set)
            except RuntimeError:  # the loop is closed: this server has stopped already
                pass

        watch_parent(parent_lost)
        try:
            await self.start()
            await requested.wait()
            log.info("stop requested; draining for up to %.1f s", self.config.grace_s)
            await self.stop()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)


def build_server(
    config: ServerConfig,
    bindings: Sequence[ServiceBinding],
    *,
    verifier: TokenVerifier | None,
    registry: CollectorRegistry | None = None,
) -> ChassisServer:
    """Assemble a grpc.aio server with the chassis interceptor, health, reflection and the bound port.

    Must be called inside a running event loop. Raises ConfigError for plaintext on a non-loopback host or a
    stream window below HTTP/2's minimum.
    """
    check_transport(config.host, config.tls, config.insecure)
    if config.stream_window_bytes < MIN_STREAM_WINDOW_BYTES:
        raise ConfigError(f"the stream window is {config.stream_window_bytes} bytes; HTTP/2 needs at least "
                          f"{MIN_STREAM_WINDOW_BYTES} (--stream-window-kib 64 or more)", field="--stream-window-kib")
    registry = registry if registry is not None else CollectorRegistry()
    rpc_metrics = build_rpc_metrics(registry)
    public = frozenset().union(*(b.public_methods for b in bindings))
    server = grpc.aio.server(
        interceptors=[ChassisInterceptor(verifier=verifier, public_methods=public, metrics=rpc_metrics)],
        options=server_options(config),
    )
    for binding in bindings:
        binding.add_to_server(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [b.name for b in bindings]
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    target = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    if config.tls is not None:
        port = server.add_secure_port(target, server_credentials(config.tls))
    else:
        port = server.add_insecure_port(target)
    chassis = ChassisServer(server, port, health, names, config, registry, rpc_metrics)
    if isinstance(verifier, FleetVerifier):  # its revocation feed runs while the server does
        chassis.on_start(verifier.start)
        chassis.on_stop(verifier.close)
    return chassis
