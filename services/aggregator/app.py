"""Composition root of the aggregator: stores, planner, devices, coordinator, round driver, servicer, server."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from raffm.checkpoints import checkpoint_store_from_url
from raffm.chunkwire import UPLOAD
from raffm.planning import LocalPlanner, Planner
from raffm.tickets import TicketSigner
from services.aggregator.config import JobConfig
from services.aggregator.coordinator import RoundCoordinator
from services.aggregator.db import DATABASE
from services.aggregator.devices import CachingDirectory, DeviceDirectory, RegistryDirectory
from services.aggregator.metrics import build_aggregator_metrics
from services.aggregator.servicer import SERVICE, AggregatorServicer
from services.aggregator.staging import Staging
from services.aggregator.store import round_store_from_url
from services.aggregator.versions import Evaluator, InitialModel
from services.common.auth import TokenVerifier
from services.common.server import ChassisServer, ServerConfig, bind, build_server

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorConfig:
    job: JobConfig
    data_dir: str
    ticket_secret: str
    db_url: str = ""  # default: sqlite under data_dir
    store_url: str = ""  # default: file://<data_dir>/checkpoints
    store_endpoint: str = ""  # S3 API endpoint of an s3:// store (empty: AWS, or AWS_ENDPOINT_URL_S3)
    registry_target: str = ""
    extractor_target: str = ""  # what devices are told (empty: the extractor they are configured with)
    operator_token: str = ""
    tick_s: float = 0.5
    # How long the registry's answer about a device (profile, online/offline) is reused by PollRound.
    device_cache_s: float = 2.0
    # Threads that answer PollRound (apart from the uploads' and the round driver's).
    poll_threads: int = 8
    server: ServerConfig = field(default_factory=ServerConfig)

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or DATABASE.default_url(self.data_dir)

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"file://{Path(self.data_dir).resolve() / 'checkpoints'}"


def default_initial_model(job: JobConfig) -> InitialModel:
    """Version 0 from the job's model (HF id, local folder, or the shipped MiniLM); a head the model lacks is
    initialised from the job's seed."""

    def load() -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        from raffm.arch import tied_aliases
        from raffm.models import load_global_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed)  # a new task head's init: the same seed gives the same version 0
            model = load_global_model(job.model, task=job.task, num_labels=job.num_labels,  # type: ignore[arg-type]
                                      label_names=job.labels)
        # A tied LM head (SmolLM2's) is the embedding under a second name: versions hold it once, as slice plans
        # and sub-models expect (raffm.arch.canonical_shapes); model_from_state ties it again.
        aliases = tied_aliases(model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in aliases}
        return state, model.config.to_dict()

    return load


class RoundDriver:
    """Background task: applies deadlines and closes rounds (in a worker thread) as soon as they are ready."""

    def __init__(self, coordinator: RoundCoordinator, tick_s: float) -> None:
        self.c, self.tick_s = coordinator, tick_s
        self.wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self.wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                if await asyncio.to_thread(self.c.tick):
                    await asyncio.to_thread(self.c.close_round)
            except Exception:  # noqa: BLE001 - keep driving; the round stays AGGREGATING and is retried
                log.exception("round driver step failed")
            try:
                await asyncio.wait_for(self.wake.wait(), self.tick_s)
            except TimeoutError:
                pass
            self.wake.clear()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="round-driver")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


@dataclass
class AggregatorApp:
    server: ChassisServer
    coordinator: RoundCoordinator
    driver: RoundDriver

    @property
    def address(self) -> str:
        return self.server.address


async def build_aggregator(
    config: AggregatorConfig, *, verifier: TokenVerifier | None, devices: DeviceDirectory | None = None,
    planner: Planner | None = None, initial_model: InitialModel | None = None, evaluator: Evaluator | None = None,
    registry: CollectorRegistry | None = None,
) -> AggregatorApp:
    """Build everything, start (or resume) the job, and return the not-yet-started server."""
    registry = registry if registry is not None else CollectorRegistry()
    os.makedirs(config.data_dir, exist_ok=True)
    rounds = await asyncio.to_thread(round_store_from_url, config.resolved_db_url)
    checkpoints = await asyncio.to_thread(checkpoint_store_from_url, config.resolved_store_url,
                                          endpoint=config.store_endpoint)
    if planner is None:  # the job's strategy plans in-process: pure, cached, no network hop on every poll
        planner = LocalPlanner(checkpoints, config.job.method())
    if devices is None:
        import grpc

        devices = CachingDirectory(
            RegistryDirectory(grpc.aio.insecure_channel(config.registry_target), config.operator_token),
            ttl_s=config.device_cache_s)
    if evaluator is None and config.job.eval_data:
        from services.aggregator.evaluation import default_evaluator

        evaluator = await asyncio.to_thread(default_evaluator, config.job)
    from services.aggregator.distillation import default_distiller

    distiller = await asyncio.to_thread(default_distiller, config.job)
    coordinator = RoundCoordinator(
        config.job, rounds=rounds, checkpoints=checkpoints, staging=Staging(Path(config.data_dir) / "staging"),
        planner=planner, signer=TicketSigner(config.ticket_secret), metrics=build_aggregator_metrics(registry),
        initial_model=initial_model or default_initial_model(config.job), evaluator=evaluator, distiller=distiller)
    await asyncio.to_thread(coordinator.start)
    driver = RoundDriver(coordinator, config.tick_s)
    poll_executor = ThreadPoolExecutor(config.poll_threads, thread_name_prefix="agg-poll")
    servicer = AggregatorServicer(coordinator, devices, extractor_target=config.extractor_target,
                                  on_change=driver.poke, poll_executor=poll_executor, verifier=verifier)
    binding = bind(SERVICE, servicer, codecs={"UploadUpdate": UPLOAD})
    server = build_server(config.server, [binding], verifier=verifier, registry=registry)
    server.on_start(driver.start)
    server.on_stop(driver.stop)

    async def close_store() -> None:
        poll_executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(rounds.close)

    server.on_stop(close_store)
    return AggregatorApp(server, coordinator, driver)
