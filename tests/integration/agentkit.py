"""Harness for the edge-agent integration tests: the real registry, extractor and aggregator (helper harness in
``fedloop``), a tiny random-init BERT job whose folder also holds the MiniLM tokenizer, and agents run in threads
with bounded waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from edge_agent.agent import Agent
from edge_agent.client import FaultInjector
from edge_agent.config import AgentConfig
from raffm.data import TextDataset
from raffm.v1 import aggregator_pb2, registry_pb2
from raffm_app.processes import free_port
from services.common.server import ServerConfig
from services.registry.testing import ENROLL_KEY, OPERATOR_TOKEN, RegistryHarness
from tests.integration.fedloop import SECRET, Fleet, tiny_bert_folder, tiny_job

WAIT_S = 120.0  # upper bound of every wait; tests never assert on timing


def tiny_model(root: Path) -> Path:
    """A 2-layer, hidden-32 random BERT with the real MiniLM tokenizer in the same folder (vocab 30522)."""
    from transformers import AutoTokenizer

    from raffm.models import default_model_path

    path = root / "tiny-bert"
    if not (path / "config.json").is_file():
        tiny_bert_folder(path, vocab_size=30522, max_position_embeddings=64, num_labels=2)
        AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
    return path


def toy_data(n: int = 24) -> TextDataset:
    words = [("a wonderful, moving film", 1), ("dull and far too long", 0), ("great acting", 1),
             ("a mess of a script", 0)]
    items = [words[i % len(words)] for i in range(n)]
    return TextDataset([t for t, _ in items], [y for _, y in items], ("rotten", "fresh"))


def job(model: Path, **overrides: Any) -> Any:
    base = dict(num_labels=2, rounds=1, clients_per_round=1, quorum=1, min_updates=1, batch_size=4, seq_len=16,
                local_steps=2, poll_wait_s=0.1, round_deadline_s=300.0)
    base.update(overrides)
    return tiny_job(model, **base)


def agent_config(fleet: Fleet | None, name: str, state_dir: Path, model: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = dict(
        enroll_key=ENROLL_KEY, name=name, state_dir=str(state_dir), model=str(model), memory_mb=2000, gflops=100.0,
        up_mbps=100.0, down_mbps=100.0, max_rounds=1, progress="off", backoff_initial_s=0.05, backoff_max_s=0.5,
        rpc_timeout_s=10.0, transfer_timeout_s=120.0,
    )
    if fleet is not None:
        values.update(registry=fleet.registry.address, aggregator=fleet.aggregator.address,
                      extractor=fleet.extractor.address)
    values.update(overrides)
    return AgentConfig(**values).validate()


class AgentThread:
    """An Agent running in a thread; ``join`` is bounded and fails loudly instead of hanging."""

    def __init__(self, config: AgentConfig, *, data: Any = None, faults: FaultInjector | None = None,
                 load_data: bool = False) -> None:
        """``data``: the agent's local data set (default :func:`toy_data`); ``load_data``: none, the agent loads its
        ``--data`` itself."""
        dataset = None if load_data else data if data is not None else toy_data()
        self.agent = Agent(config, dataset=dataset, faults=faults)
        self.assignments: list[Any] = []  # every assignment the agent received, in order
        handle = self.agent.handle

        def recording(a: Any) -> Any:
            self.assignments.append(a)
            return handle(a)

        self.agent.handle = recording  # type: ignore[method-assign]
        self.rc: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"agent-{config.name}")

    def _run(self) -> None:
        try:
            self.rc = self.agent.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            self.error = exc

    def start(self) -> AgentThread:
        self.thread.start()
        return self

    def join(self, timeout: float = WAIT_S) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.agent.stop("test timeout")
            self.thread.join(30)
            raise AssertionError(f"agent {self.agent.config.name} did not finish within {timeout}s; "
                                 f"outcomes: {self.agent.outcomes}")
        if self.error is not None:
            raise self.error
        assert self.rc is not None
        return self.rc

    def stop(self) -> int:
        self.agent.stop("test done")
        return self.join(60)


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = WAIT_S, interval: float = 0.05) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def list_devices(fleet: Fleet) -> list[Any]:
    reply = fleet.registry.stub.ListDevices(registry_pb2.ListDevicesRequest(page_size=1000),
                                            metadata=fleet.registry.operator, timeout=10)
    return list(reply.devices)


def rounds(fleet: Fleet) -> list[Any]:
    stub = fleet.agg_stub()
    return list(stub.ListRounds(aggregator_pb2.ListRoundsRequest(), metadata=fleet.operator, timeout=10).rounds)


class FixedPortFleet(Fleet):
    """The same services on ports chosen in advance, so an agent can be pointed at them before they exist."""

    def __init__(self, root: Path, job: Any) -> None:
        super().__init__(root, job)
        self.ports = {"registry": free_port(), "extractor": free_port(), "aggregator": free_port()}

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def start(self, *, aggregator: bool = True) -> FixedPortFleet:
        from services.common.testing import LoopThread

        self.registry = RegistryHarness(f"sqlite:///{self.root / 'registry.db'}",
                                        server=ServerConfig(port=self.ports["registry"], grace_s=1.0)).start()
        self.loop = LoopThread()
        self.loop.run(self._start_fixed())
        return self

    async def _start_fixed(self) -> None:
        from services.aggregator.app import AggregatorConfig, build_aggregator
        from services.common.auth import fleet_verifier
        from services.extractor.app import ExtractorConfig, build_extractor

        ext = ExtractorConfig(store_url=f"file://{self.root / 'agg' / 'checkpoints'}", ticket_secret=SECRET,
                              server=ServerConfig(port=self.ports["extractor"], grace_s=1.0))
        self.extractor = await build_extractor(
            ext, verifier=fleet_verifier(self.registry.address, OPERATOR_TOKEN), registry=CollectorRegistry())
        await self.extractor.server.start()
        agg = AggregatorConfig(job=self.job, data_dir=str(self.root / "agg"), ticket_secret=SECRET,
                               registry_target=self.registry.address, operator_token=OPERATOR_TOKEN,
                               extractor_target=self.extractor.address, tick_s=0.05,
                               server=ServerConfig(port=self.ports["aggregator"], grace_s=1.0))
        self.aggregator = await build_aggregator(agg, verifier=fleet_verifier(self.registry.address, OPERATOR_TOKEN),
                                                 registry=self.metrics)
        await self.aggregator.server.start()


__all__ = ["AgentThread", "FixedPortFleet", "Fleet", "agent_config", "job", "list_devices", "rounds", "tiny_model",
           "toy_data", "wait_for", "replace", "FaultInjector", "OPERATOR_TOKEN"]
