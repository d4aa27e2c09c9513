"""Prometheus metrics of the chassis, built on a registry the caller owns (tests use a fresh one).

Labels are low-cardinality by construction: gRPC service, method and status code; never a device id.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

# Unary registry calls take ~1 ms; streamed model transfers take minutes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0, 900.0)
RPC_LABELS = ("grpc_service", "grpc_method", "grpc_code")


@dataclass(frozen=True)
class RpcMetrics:
    """RPC count and latency by service, method and status code."""

    handled: Counter
    latency: Histogram

    def observe(self, full_method: str, code_name: str, seconds: float) -> None:
        service, method = split_method(full_method)
        self.handled.labels(service, method, code_name).inc()
        self.latency.labels(service, method, code_name).observe(seconds)


def build_rpc_metrics(registry: CollectorRegistry) -> RpcMetrics:
    """Register the RPC metrics on ``registry``."""
    return RpcMetrics(
        handled=Counter(
            "raffm_grpc_server_handled", "RPCs completed on the server, by method and status code.",
            RPC_LABELS, registry=registry,
        ),
        latency=Histogram(
            "raffm_grpc_server_handling_seconds", "Time from RPC start to its status, by method and status code.",
            RPC_LABELS, registry=registry, buckets=LATENCY_BUCKETS,
        ),
    )


def split_method(full_method: str) -> tuple[str, str]:
    """'/raffm.v1.RegistryService/Register' -> ('raffm.v1.RegistryService', 'Register')."""
    service, _, method = full_method.lstrip("/").partition("/")
    return service or "unknown", method or "unknown"


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (prometheus_client's server in a daemon thread)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server, self._thread = server, thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics``; port 0 picks a free port (see ``.port``)."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
