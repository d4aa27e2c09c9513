"""Harness for the federated-loop integration tests: registry + extractor + aggregator on 127.0.0.1 port 0.

The registry is the real service (SQLite file); the extractor and aggregator run in one background event loop with
real SQLite and a file checkpoint store (or the ``store_url`` given, e.g. an s3:// bucket); more extractor replicas
can be started on the same store; scripted devices use sync gRPC stubs with their own registry tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry
from transformers import BertConfig, BertForSequenceClassification

from edge_agent.client import aggregator_stub
from raffm.checkpoints import CheckpointStore, checkpoint_store_from_url
from raffm.fitting import FitResult, RoundBudget
from raffm.planning import cost_model_for, slice_plan_for
from raffm.proto import spec_from_proto
from raffm.reassembly import MemorySink
from raffm.slicing import SlicePlan
from raffm.spec import ElasticSpec
from raffm.v1 import aggregator_pb2, extractor_pb2_grpc
from raffm.wire import WIRE_DTYPES, WirePayload
from services.aggregator.app import AggregatorApp, AggregatorConfig, build_aggregator
from services.aggregator.config import JobConfig
from services.common.auth import auth_metadata, fleet_verifier
from services.common.server import ServerConfig
from services.common.testing import LoopThread
from services.extractor.app import ExtractorApp, ExtractorConfig, build_extractor
from services.registry.testing import OPERATOR_TOKEN, RegistryHarness

SECRET = "test-ticket-secret-0123456789"
GRPC_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def tiny_bert_folder(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random-init BERT classifier saved as an HF folder (the job's ``model``)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=32, num_labels=3)
    cfg.update(overrides)
    BertForSequenceClassification(BertConfig(**cfg)).save_pretrained(path)
    return path


def tiny_job(model: Path, **overrides: Any) -> JobConfig:
    base = dict(job_id="job", model=str(model), num_labels=3, rounds=2, clients_per_round=3, quorum=3,
                round_deadline_s=120.0, batch_size=64, seq_len=32, local_steps=2, poll_wait_s=0.1)
    base.update(overrides)
    return JobConfig(**base)


def budget_ladder(job: JobConfig, config: dict[str, Any], max_mb: int = 1024) -> list[tuple[int, ElasticSpec]]:
    """(smallest integer training-memory budget in MiB, the spec the core fitter picks for it), smallest first.

    Found by asking the job's strategy itself (the registry stores whole MiB), so the tests follow the fitter.
    """
    out: list[tuple[int, ElasticSpec]] = []
    full = ElasticSpec.full(cost_model_for(config).dims)
    for budget in range(1, max_mb + 1):
        if out and out[-1][1] == full:
            break
        try:
            spec = expected_fit(job, config, budget).spec
        except ValueError:
            continue
        if not out or out[-1][1] != spec:
            out.append((budget, spec))
    return out


def budgets_for(job: JobConfig, config: dict[str, Any], picks: tuple[str, ...] = ("top", "mid", "bottom")) -> list[int]:
    """Training-memory budgets (MiB) that make the core fitter pick the top, the second, a middle or the bottom
    rung, or ``narrow``: the smallest one that keeps the full hidden width."""
    ladder_ = budget_ladder(job, config)
    hidden = ladder_[-1][1].hidden
    index = {"top": len(ladder_) - 1, "second": len(ladder_) - 2, "mid": len(ladder_) // 2, "bottom": 0,
             "narrow": next(i for i, (_, spec) in enumerate(ladder_) if spec.hidden == hidden)}
    return [ladder_[index[p]][0] for p in picks]


def expected_fit(job: JobConfig, config: dict[str, Any], train_memory_mb: float, deadline_s: float = 100.0,
                 **profile: Any) -> FitResult:
    """What the job's strategy plans for a device of the registry harness's default profile."""
    p = dict(gflops=200.0, up_mbps=50.0, down_mbps=200.0)
    p.update(profile)
    return job.method().plan(cost_model_for(config), RoundBudget(
        train_memory_mb=train_memory_mb, deadline_s=deadline_s, batch_size=job.batch_size, seq_len=job.seq_len,
        local_steps=job.local_steps or 10, **p), wire_dtype=job.wire_dtype)


@dataclass
class Device:
    name: str
    device_id: str
    token: str

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(self.token)


@dataclass
class Fleet:
    root: Path
    job: JobConfig
    registry: RegistryHarness | None = None
    loop: LoopThread | None = None
    extractor: ExtractorApp | None = None
    aggregator: AggregatorApp | None = None
    devices: dict[str, Device] = field(default_factory=dict)
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)
    evaluator: Any = None
    initial_model: Any = None
    db_url: str = ""  # the aggregator's round store; default SQLite under root/agg
    device_cache_s: float = 2.0
    store_url: str = ""  # the checkpoint store; default a directory under root/agg
    liveness_window_s: float = 60.0  # the registry's (devices heartbeat every third of it)
    replicas: list[ExtractorApp] = field(default_factory=list)  # extractors started by add_extractor()
    serve_metrics: bool = False  # /metrics over HTTP on free ports (server.metrics_port), as the services' CLIs do

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"file://{self.root / 'agg' / 'checkpoints'}"

    @property
    def server_config(self) -> ServerConfig:
        return ServerConfig(grace_s=1.0, metrics_port=0 if self.serve_metrics else None)

    def start(self, *, aggregator: bool = True) -> Fleet:
        self.registry = RegistryHarness(f"sqlite:///{self.root / 'registry.db'}",
                                        liveness_window_s=self.liveness_window_s).start()
        self.loop = LoopThread()
        self.loop.run(self._start_extractor())
        if aggregator:
            self.start_aggregator()
        return self

    async def _start_extractor(self) -> None:
        self.extractor = await self._new_extractor()

    async def _new_extractor(self) -> ExtractorApp:
        cfg = ExtractorConfig(store_url=self.resolved_store_url, ticket_secret=SECRET, server=self.server_config)
        app = await build_extractor(
            cfg, verifier=fleet_verifier(self.registry.address, OPERATOR_TOKEN), registry=CollectorRegistry())
        await app.server.start()
        return app

    def add_extractor(self) -> ExtractorApp:
        """Another extractor replica on the same checkpoint store (its own port, cache and metrics)."""
        app = self.loop.run(self._new_extractor())
        self.replicas.append(app)
        return app

    def start_aggregator(self) -> AggregatorApp:
        async def go() -> AggregatorApp:
            cfg = AggregatorConfig(job=self.job, data_dir=str(self.root / "agg"), ticket_secret=SECRET,
                                   registry_target=self.registry.address, operator_token=OPERATOR_TOKEN,
                                   extractor_target=self.extractor.address, tick_s=0.05, db_url=self.db_url,
                                   store_url=self.store_url,
                                   device_cache_s=self.device_cache_s, server=self.server_config)
            app = await build_aggregator(cfg, verifier=fleet_verifier(self.registry.address, OPERATOR_TOKEN),
                                         evaluator=self.evaluator, registry=self.metrics,
                                         initial_model=self.initial_model)
            await app.server.start()
            return app

        self.aggregator = self.loop.run(go(), timeout=120)
        return self.aggregator

    def stop_aggregator(self) -> None:
        if self.aggregator is not None:
            self.loop.run(self.aggregator.server.stop(0.5))
            self.aggregator = None

    def stop(self) -> None:
        self.stop_aggregator()
        for app in [self.extractor, *self.replicas]:
            if app is not None:
                self.loop.run(app.server.stop(0.5))
        if self.loop is not None:
            self.loop.close()
        if self.registry is not None:
            self.registry.stop()

    # -- devices ------------------------------------------------------------------------------------------------------

    def register(self, name: str, **profile: Any) -> Device:
        reply = self.registry.register(name, **profile)
        dev = Device(name, reply.device_id, reply.token)
        self.devices[name] = dev
        return dev

    @property
    def store(self) -> CheckpointStore:
        return checkpoint_store_from_url(self.resolved_store_url)

    def agg_stub(self, target: str | None = None) -> Any:
        target = target or f"127.0.0.1:{self.aggregator.server.port}"
        return aggregator_stub(grpc.insecure_channel(target, options=GRPC_OPTIONS))

    def ext_stub(self, app: ExtractorApp | None = None) -> Any:
        port = (app or self.extractor).server.port
        return extractor_pb2_grpc.ExtractorServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS))

    @property
    def operator(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(OPERATOR_TOKEN)

    def poll(self, stub: Any, dev: Device) -> aggregator_pb2.PollReply:
        return stub.PollRound(aggregator_pb2.PollRequest(device_id=dev.device_id), metadata=dev.md, timeout=30)

    def one_scripted_round(self, **upload: Any) -> aggregator_pb2.Round:
        """One device trains the open round with a scripted delta (``upload``: more of :func:`upload_messages`'s
        arguments, e.g. ``metrics``); the round once it has ended."""
        from edge_agent.transfer import upload_once

        dev = self.register("d", train_memory_mb=1000, tier="laptop")
        stub = self.agg_stub()
        a = self.poll(stub, dev).assignment
        delta = scripted_delta(download(self, dev, a), seed=0, scale=0.1, assignment=a)
        assert upload_once(stub, a.ticket, 5, payload(delta, self.job.wire_dtype), metadata=dev.md, **upload).accepted
        return self.wait_round(stub, a.round_id)

    def wait_round(self, stub: Any, round_id: str,
                   states: tuple[int, ...] = (aggregator_pb2.ROUND_STATE_CLOSED, aggregator_pb2.ROUND_STATE_FAILED),
                   timeout: float = 60) -> aggregator_pb2.Round:
        """The round once it is in one of ``states`` (by default: once it has ended, either way), or as it is at the
        timeout; the caller asserts the state it expects."""
        end = time.monotonic() + timeout
        while True:
            r = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id=round_id), metadata=self.operator, timeout=10)
            if r.state in states or time.monotonic() > end:
                return r
            time.sleep(0.05)


def download(fleet: Fleet, dev: Device, assignment: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    from edge_agent.transfer import download_once

    sink = MemorySink()
    d = download_once(fleet.ext_stub(), assignment.ticket, sink, metadata=dev.md, **kwargs)
    d.reassembler.finish()
    return sink.tensors


def plan_of(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], spec: ElasticSpec) -> SlicePlan:
    return slice_plan_for(config, spec, shapes)


def scripted_delta(received: dict[str, torch.Tensor], seed: int, scale: float = 1e-2, *, assignment: Any = None
                   ) -> dict[str, torch.Tensor]:
    """A deterministic 'training' result: a random delta of the received slice, in its wire dtype, for the tensors
    the assignment's recipe trains (every tensor without an assignment)."""
    frozen = set(assignment.recipe.frozen_tensors) if assignment is not None else set()
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(t.shape, generator=g) * scale).to(t.dtype) for n, t in received.items()
            if n not in frozen}


def payload(delta: dict[str, torch.Tensor], wire_dtype: str) -> WirePayload:
    return WirePayload.from_state(delta, wire_dtype)


def spec_of(assignment: Any) -> ElasticSpec:
    return spec_from_proto(assignment.spec)


__all__ = ["Fleet", "Device", "tiny_bert_folder", "tiny_job", "budgets_for", "budget_ladder", "expected_fit", "download", "plan_of", "scripted_delta",
           "payload", "spec_of", "WIRE_DTYPES", "replace"]
