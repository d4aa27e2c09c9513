"""Composition root of the registry: builds repository, use cases, servicer, verifier and server from a config."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge

from raffm.errors import ConfigError
from services.common.auth import CachingTokenVerifier, ChainedTokenVerifier, StaticTokenVerifier
from services.common.server import ChassisServer, ServerConfig, bind, build_server
from services.common.tls import check_transport
from services.registry.liveness import LivenessBuffer
from services.registry.metrics import build_registry_metrics
from services.registry.repository import DeviceRepository, open_repository
from services.registry.service import Clock, RegistryService, RegistrySettings, utc_now
from services.registry.servicer import PUBLIC_METHODS, SERVICE, LocalTokenVerifier, RegistryServicer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryConfig:
    """Everything ``raffm registry serve`` needs."""

    db_url: str
    enroll_key: str
    fleet: str = "default"
    # Operators and other services (aggregator, extractor) authenticate with this; empty disables it.
    operator_token: str = ""
    liveness_window_s: float = 90.0
    # How often silent devices are persisted as offline; None: min(window / 3, 30 s).
    sweep_interval_s: float | None = None
    db_threads: int = 8
    # Device tokens verified in the last few seconds skip the database; deregistration evicts them at once.
    token_cache_ttl_s: float = 5.0
    # Heartbeats of confirmed devices are kept in memory and written in one transaction this often (see
    # liveness.LivenessBuffer); a crash loses at most this much of last-seen times. 0: one transaction per heartbeat.
    heartbeat_flush_s: float = 0.5
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class RegistryApp:
    """A built registry: ``await app.server.start()`` / ``await app.server.stop()``."""

    server: ChassisServer
    service: RegistryService
    repo: DeviceRepository  # the storage; ``service.repo`` is the same behind the heartbeat buffer, if any
    sweeper: Sweeper
    liveness: LivenessBuffer | None = None  # None: heartbeats written through (heartbeat_flush_s = 0)
    flusher: Periodic | None = None

    @property
    def address(self) -> str:
        return self.server.address


class Periodic:
    """Background task: runs ``fn`` in ``executor`` every ``interval_s``; a failure is logged, later runs go on."""

    def __init__(self, name: str, fn: Callable[[], int], interval_s: float, executor: ThreadPoolExecutor) -> None:
        self._name, self._fn, self._interval, self._executor = name, fn, interval_s, executor
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._fn)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - a database hiccup must not stop later runs
                log.exception("%s failed", self._name)
            await asyncio.sleep(self._interval)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


class Sweeper(Periodic):
    """Periodically persists silent devices as offline."""

    def __init__(self, service: RegistryService, interval_s: float, executor: ThreadPoolExecutor) -> None:
        super().__init__("registry-sweeper", service.sweep, interval_s, executor)

    async def sweep_once(self) -> int:
        return await self.run_once()


async def build_registry(
    config: RegistryConfig,
    *,
    clock: Clock = utc_now,
    registry: CollectorRegistry | None = None,
    repository: DeviceRepository | None = None,
) -> RegistryApp:
    """Open (and migrate) the database, enroll the fleet, and assemble the server. Call inside the event loop."""
    check_transport(config.server.host, config.server.tls, config.server.insecure)  # fail before touching the DB
    registry = registry if registry is not None else CollectorRegistry()
    if config.heartbeat_flush_s < 0:
        raise ConfigError(f"the heartbeat flush interval must be >= 0 s, got {config.heartbeat_flush_s}",
                          field="--heartbeat-flush-s")
    repo = repository if repository is not None else await asyncio.to_thread(open_repository, config.db_url)
    # The use cases read and write through the heartbeat buffer; ``RegistryApp.repo`` stays the storage itself.
    # Confirmations last one liveness window: longer than a device's heartbeat interval (window / 3), so a steady
    # device's heartbeat never writes, and its token verification (every token-cache TTL) renews it.
    liveness = (LivenessBuffer(repo, confirm_s=config.liveness_window_s) if config.heartbeat_flush_s > 0 else None)
    executor = ThreadPoolExecutor(config.db_threads, thread_name_prefix="registry-db")
    try:
        service = RegistryService(liveness or repo, RegistrySettings(config.liveness_window_s), clock=clock)
        service.metrics = build_registry_metrics(registry, service.device_counts)
        await asyncio.to_thread(service.enroll, config.fleet, config.enroll_key)
        device_tokens = CachingTokenVerifier(LocalTokenVerifier(service, executor), ttl_s=config.token_cache_ttl_s)
        servicer = RegistryServicer(service, executor, on_revoke=device_tokens.invalidate_subject)
        Gauge("raffm_registry_revocation_watchers", "Services holding the revocation feed open (the aggregator and "
              "each extractor; one missing re-checks device tokens every second).",
              registry=registry).set_function(lambda: servicer.revocations.watchers)
        verifier = ChainedTokenVerifier([StaticTokenVerifier({"operator": config.operator_token}), device_tokens])
        binding = bind(SERVICE, servicer, public_methods=PUBLIC_METHODS)
        server = build_server(config.server, [binding], verifier=verifier, registry=registry)
    except BaseException:
        executor.shutdown(wait=False)
        repo.close()
        raise
    interval = config.sweep_interval_s or min(config.liveness_window_s / 3, 30.0)
    sweeper = Sweeper(service, interval, executor)

    async def close_resources() -> None:
        await asyncio.to_thread(executor.shutdown, True)
        await asyncio.to_thread((liveness or repo).close)  # the buffer flushes, then closes the storage

    # Stop hooks run in reverse order: the background tasks stop first, then closing the repository flushes what
    # heartbeats are still pending.
    server.on_stop(close_resources)
    server.on_drain(servicer.revocations.close)
    server.on_start(sweeper.start)
    server.on_stop(sweeper.stop)
    flusher = None
    if liveness is not None:
        flusher = Periodic("registry-heartbeat-flush", liveness.flush, config.heartbeat_flush_s, executor)
        server.on_start(flusher.start)
        server.on_stop(flusher.stop)
    return RegistryApp(server, service, repo, sweeper, liveness, flusher)
