"""Planning: which sub-model a device trains, from its profile and the job, behind one interface; and the facts of a
global model that planning and slicing read from its HF config dict.

:class:`Planner` is what the services depend on. :class:`LocalPlanner` runs a strategy's plan (the core cost model
:class:`raffm.costs.CostModel` and budget fitter :func:`raffm.fitting.fit`; :func:`raffm.fitting.fit_inference` for
deployment) against a version of the checkpoint store: the aggregator plans every assignment with it and its job's
strategy, and the extractor's Plan RPC answers operators with it. Nothing else holds a cost model of its own: :func:`cost_model_for` is the one
factory (the agent's memory check uses it too), so a plan is exactly what ``fit()`` returns for the same model and
profile.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import AutoConfig, PretrainedConfig

from raffm.arch import ADAPTERS, Adapter, adapter_for
from raffm.checkpoints import CheckpointStore
from raffm.costs import CostModel
from raffm.errors import PreconditionError, ValidationError
from raffm.fitting import FitResult, RoundBudget, fit_inference
from raffm.models import Task, model_from_config
from raffm.profile import DeviceProfile
from raffm.recipe import Recipe
from raffm.slicing import SlicePlan, slice_plan
from raffm.spec import ElasticSpec, ModelDims
from raffm.strategy import STRATEGIES, Strategy

# ----------------------------------------------------------------------------------------------------- global models


def adapter_and_dims(config: Mapping[str, Any]) -> tuple[Adapter, ModelDims]:
    """The architecture adapter and dims of a global model's HF config dict (e.g. a checkpoint version's)."""
    return _adapter_and_dims(json.dumps(dict(config), sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _adapter_and_dims(config_json: str) -> tuple[Adapter, ModelDims]:
    values = json.loads(config_json)
    # The config class, not the bare dict: adapters read the standard names, which some families only alias
    # (DistilBERT's hidden_size is its dim, num_attention_heads its n_heads).
    config = AutoConfig.for_model(str(values.pop("model_type")), **values)
    adapter = adapter_for(config)
    return adapter, adapter.dims(config)


def slice_plan_for(config: Mapping[str, Any], spec: ElasticSpec, shapes: Mapping[str, tuple[int, ...]]) -> SlicePlan:
    """The slice plan of ``spec`` over global tensors of ``shapes``, for the model a config dict describes."""
    adapter, dims = adapter_and_dims(config)
    return slice_plan(adapter, dims, spec, dict(shapes))


def default_task(model_type: str) -> Task:
    """The task a global model of ``model_type`` is trained for when nobody says: ViT classifies images, a decoder
    LLM (an adapter with ``causal_lm``: the Llama family, OPT, Phi, GPT-2, GPT-NeoX) generates text, an encoder
    classifies text."""
    if model_type == "vit":
        return "image-classification"
    if any(a.causal_lm and model_type in a.model_types for a in ADAPTERS):
        return "causal-lm"
    return "sequence-classification"


@functools.lru_cache(maxsize=16)
def _cost_model(config_json: str, task: Task | None) -> CostModel:
    values = json.loads(config_json)
    model_type = str(values.pop("model_type"))
    config = AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = model_from_config(config, task=task or default_task(model_type))
    return CostModel.from_model(model)


def cost_model_for(config: Mapping[str, Any] | PretrainedConfig, task: Task | None = None) -> CostModel:
    """The core cost model of a global model from its HF config (a dict or a config object), cached per config and
    task (default: :func:`default_task`)."""
    if isinstance(config, PretrainedConfig):
        key = config.to_json_string(use_diff=False)
    else:
        key = json.dumps(dict(config), sort_keys=True, default=str)
    return _cost_model(key, task)


# ----------------------------------------------------------------------------------------------------- plans


class NoFitError(PreconditionError):
    """Not even the smallest sub-model fits the profile (the message is the fitter's)."""

    default_hint = "give the device more memory or bandwidth, or the job a longer deadline or smaller batch"


@dataclass(frozen=True)
class PlanJob:
    """Job parameters that drive the cost model (raffm.v1.JobParams).

    ``optimizer`` is carried for the protocol; the core cost model counts AdamW state (2 fp32 moments), which
    over-estimates SGD's memory, so an SGD job is planned conservatively.
    """

    batch_size: int = 16
    seq_len: int = 64
    wire_dtype: str = "float32"
    deadline_s: float = 600.0
    local_steps: int = 10
    optimizer: str = "adamw"
    holds_frozen: bool = False  # the device kept the frozen tensors of an earlier round (see RoundBudget)
    round_index: int = 0  # the round planned for (1 is the first; 0: none in particular), see Strategy.plan


@dataclass(frozen=True)
class PlanResult:
    spec: ElasticSpec
    full_spec: ElasticSpec
    model_version: str
    param_fraction: float
    cost: dict[str, float] = field(default_factory=dict)  # raffm.v1.CostEstimate fields
    recipe: Recipe = Recipe()  # how the device trains the spec
    fit: FitResult | None = None  # the core fitter's answer (None when the plan came over gRPC)
    # What the caller planned with besides the cost model (declared profile, calibration, steps): kept with the
    # assignment so the device's report can be compared with the prediction.
    basis: dict[str, float] = field(default_factory=dict)


class Planner(Protocol):
    def plan(self, profile: DeviceProfile, job: PlanJob, model_version: str, *, infer: bool = False) -> PlanResult:
        """Raise NoFitError when nothing fits."""


def round_budget(profile: DeviceProfile, job: PlanJob, cost_model: CostModel) -> RoundBudget:
    """The fitter's budget: the device's resources plus the job's batch, sequence length, steps and deadline.

    ``ValidationError`` (INVALID_ARGUMENT) for values the fitter refuses (zero bandwidth, negative memory...).
    """
    seq_len = cost_model.image_tokens if cost_model.image_tokens is not None else job.seq_len
    try:
        return RoundBudget(
            train_memory_mb=profile.train_memory_mb, gflops=profile.gflops, up_mbps=profile.up_mbps,
            down_mbps=profile.down_mbps, deadline_s=job.deadline_s, batch_size=job.batch_size, seq_len=seq_len,
            local_steps=max(job.local_steps, 1), infer_memory_mb=profile.infer_memory_mb or None,
            holds_frozen=job.holds_frozen)
    except ValueError as exc:
        raise ValidationError(str(exc), field="profile") from None


def cost_fields(result: FitResult, *, infer: bool) -> dict[str, float]:
    """The raffm.v1.CostEstimate fields of a fit result."""
    c = result.costs
    t = result.round_time
    return {
        "params": c.params, "wire_bytes": c.wire_bytes, "upload_bytes": c.upload_bytes,
        "trained_params": c.trained_params,
        "flops_per_sample": c.forward_flops_per_sample if infer else c.flops_per_sample,
        "train_memory_mb": c.train_memory_mb, "infer_memory_mb": c.infer_memory_mb,
        "download_s": t.download_s, "compute_s": t.compute_s, "upload_s": t.upload_s, "est_seconds": t.total_s,
    }


class LocalPlanner:
    """Plans in-process with a strategy (RaFFM's by default) against the version's config (from the checkpoint store).
    """

    def __init__(self, store: CheckpointStore, strategy: Strategy = STRATEGIES["raffm"]) -> None:
        self._store = store
        self.strategy = strategy

    def plan(self, profile: DeviceProfile, job: PlanJob, model_version: str, *, infer: bool = False) -> PlanResult:
        cm = cost_model_for(self._store.info(model_version).config)
        try:
            if infer:
                budget = profile.infer_memory_mb or profile.train_memory_mb
                result = fit_inference(cm, budget, batch_size=job.batch_size,
                                       seq_len=None if cm.image_tokens is not None else job.seq_len)
            else:
                result = self.strategy.plan(cm, round_budget(profile, job, cm), wire_dtype=job.wire_dtype,
                                            round_index=job.round_index)
        except ValidationError:
            raise
        except ValueError as exc:
            raise NoFitError(f"no sub-model of {model_version} fits this profile: {exc}", field="profile") from None
        full = ElasticSpec.full(cm.dims)
        return PlanResult(spec=result.spec, full_spec=full, model_version=model_version,
                          param_fraction=result.costs.params / cm.params(full),
                          cost=cost_fields(result, infer=infer), recipe=result.recipe, fit=result)
