"""Model versions of a job: version 0 and the next version of every round (both as the job's strategy makes them:
salience ordering, server update), writing versions to the checkpoint store, and evaluating them.

Versions are named ``<job>-v<round>``; the extractor cuts slices from them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raffm.aggregation import SlicedFedAvg
from raffm.checkpoints import CheckpointStore, fsync_dir, read_safetensors, write_safetensors
from raffm.planning import cost_model_for, slice_plan_for
from raffm.slicing import SlicePlan
from raffm.spec import ElasticSpec
from raffm.threshold import fleet_prior
from raffm.wire import itemsize
from services.aggregator.config import JobConfig
from services.aggregator.metrics import AggregatorMetrics

log = logging.getLogger(__name__)

InitialModel = Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]
# (state, config, label prior) -> {metric: value}; the prior is the label shares of the data that the round's devices
# reported (raffm.threshold.fleet_prior), None when none did (a language model, or devices that send no counts)
Evaluator = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any], torch.Tensor | None], Mapping[str, float]]
# (state, config, round) -> the state after the strategy's server distillation step
Distiller = Callable[[dict[str, torch.Tensor], Mapping[str, Any], int], dict[str, torch.Tensor]]


def version_name(job_id: str, round_index: int) -> str:
    """``<job>-v<round>``: the version a round produces (round 0: the initial model)."""
    return f"{job_id}-v{round_index}"


@dataclass
class GlobalModel:
    """The global model rounds start from: its version, its tensors and its HF config dict."""

    version: str
    state: dict[str, torch.Tensor]
    config: dict[str, Any]

    def slice_plan(self, spec: ElasticSpec) -> SlicePlan:
        return slice_plan_for(self.config, spec, {n: tuple(t.shape) for n, t in self.state.items()})

    def wire_bytes(self, wire_dtype: str) -> int:
        """Bytes of the whole model on the wire (what full-model FedAvg moves one way per device)."""
        size = itemsize(wire_dtype)
        return sum(t.numel() * size for t in self.state.values() if t.is_floating_point())


class Versions:
    """Creates, stores, loads and evaluates the job's model versions."""

    def __init__(self, job: JobConfig, checkpoints: CheckpointStore, metrics: AggregatorMetrics,
                 initial_model: InitialModel, evaluator: Evaluator | None = None, *, state_dir: Path,
                 distiller: Distiller | None = None) -> None:
        self.job, self.checkpoints, self.metrics, self.state_dir = job, checkpoints, metrics, state_dir
        self.strategy = job.method()
        self._initial_model, self._evaluator, self._distiller = initial_model, evaluator, distiller
        if self.strategy.server_distill_steps and distiller is None:
            raise ValueError("the strategy's server_distill_steps needs a distiller (the job's distill_data)")

    def create_initial(self) -> GlobalModel:
        """Version 0: the job's initial model as the strategy prepares it (salience-ordered), stored."""
        state, config = self._initial_model()
        state = self.strategy.initial(state, cost_model_for(config))
        version = version_name(self.job.job_id, 0)
        self.checkpoints.put(version, state, config, meta={"job": self.job.job_id, "round": 0})
        return GlobalModel(version, state, config)

    def load(self, version: str, config: dict[str, Any] | None = None) -> GlobalModel:
        """A stored version (with its own config unless ``config`` is given)."""
        if config is None:
            config = self.checkpoints.info(version).config
        return GlobalModel(version, self.checkpoints.load(version), config)

    def publish(self, round_index: int, previous: GlobalModel, agg: SlicedFedAvg, participants: int) -> GlobalModel:
        """A finished round's result as the next version (the strategy's server update and ordering, then its
        distillation step), stored; the server's momentum, when the strategy keeps one, is stored beside it (the
        aggregator's own state)."""
        cm = cost_model_for(previous.config)
        momentum = self._momentum(previous.version) if self.strategy.server_momentum else None
        state, buffer = self.strategy.next_version(agg.result(), cm, previous=previous.state, momentum=momentum,
                                                   round_index=round_index)
        if self._distiller is not None:
            state = self._distiller(state, previous.config, round_index)
        version = version_name(self.job.job_id, round_index)
        self.checkpoints.put(version, state, previous.config, parent=previous.version,
                             meta={"job": self.job.job_id, "round": round_index, "participants": participants})
        if buffer is not None:  # written whole or not at all: a crash re-aggregates the round and writes it again
            self.state_dir.mkdir(parents=True, exist_ok=True)
            path = self.state_dir / f"{version}.momentum.safetensors"
            write_safetensors(path.with_suffix(".tmp"), buffer)
            os.replace(path.with_suffix(".tmp"), path)
            fsync_dir(self.state_dir)
        return GlobalModel(version, state, previous.config)

    def _momentum(self, version: str) -> dict[str, torch.Tensor] | None:
        """The server momentum stored with ``version`` (None for version 0, or a job that just turned it on)."""
        path = self.state_dir / f"{version}.momentum.safetensors"
        return read_safetensors(path) if path.exists() else None

    def evaluate(self, model: GlobalModel, label_counts: Sequence[int] = ()) -> dict[str, float]:
        """The evaluator's figures for a version, also published as ``raffm_aggregator_eval`` ({} when off or
        failed); ``label_counts``: examples per label that the round's devices reported of their data."""
        if self._evaluator is None or not self.job.evaluate:
            return {}
        prior = fleet_prior(label_counts) if sum(label_counts) > 0 else None
        try:
            evaluation = {k: float(v) for k, v in self._evaluator(model.state, model.config, prior).items()}
        except Exception:  # noqa: BLE001 - an evaluation bug must not lose the round
            log.exception("evaluation of %s failed", model.version)
            return {}
        for name, value in evaluation.items():
            metric, _, size = name.partition("@")  # "accuracy@0.25": metric accuracy, sub-model size 0.25
            self.metrics.eval_metric.labels(metric, size or "full").set(value)
        return evaluation
