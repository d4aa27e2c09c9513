"""Planning: the largest sub-model a device profile can train within the job's deadline.

``Planner`` is the interface the aggregator depends on; ``LocalPlanner`` runs the core cost model
(:class:`raffm.costs.CostModel`) and budget fitter (:func:`raffm.fitting.fit` / :func:`raffm.fitting.fit_inference`)
in-process (the extractor's Plan RPC uses it, and so can an aggregator without an extractor); ``GrpcPlanner`` asks
the extractor. The services hold no cost model of their own: what Plan returns is exactly what ``fit()`` returns for
the same model and profile.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from raffm.checkpoints import CheckpointStore
from raffm.costs import CostModel, Costs
from raffm.fitting import FitResult, RoundBudget, fit, fit_inference
from raffm.profile import DeviceProfile
from raffm.spec import ElasticSpec, ModelDims
from raffm.proto import profile_to_proto, spec_from_proto, wire_dtype_to_proto
from raffm.errors import PreconditionError, ValidationError

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


@dataclass(frozen=True)
class PlanResult:
    spec: ElasticSpec
    full_spec: ElasticSpec
    model_version: str
    param_fraction: float
    cost: dict[str, float] = field(default_factory=dict)  # raffm.v1.CostEstimate fields
    fit: FitResult | None = None  # the core fitter's answer (None when the plan came over gRPC)


class Planner(Protocol):
    def plan(self, profile: DeviceProfile, job: PlanJob, model_version: str, *, infer: bool = False) -> PlanResult:
        """Raise NoFitError when nothing fits."""


@functools.lru_cache(maxsize=16)
def _cost_model(config_json: str) -> CostModel:
    from transformers import AutoConfig

    from raffm.models import model_from_config

    data = json.loads(config_json)
    values = dict(data)
    model_type = str(values.pop("model_type"))
    config = AutoConfig.for_model(model_type, **values)
    task = "image-classification" if model_type == "vit" else "sequence-classification"
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = model_from_config(config, task=task)  # type: ignore[arg-type]
    return CostModel.from_model(model)


def cost_model_for(config: dict[str, Any]) -> CostModel:
    """The core cost model of a global model, from its HF config dict (cached per config)."""
    return _cost_model(json.dumps(config, sort_keys=True, default=str))


@dataclass(frozen=True)
class ModelShape:
    """Adapter name, dims and global tensor shapes of a model config (what slicing and SPP need)."""

    dims: ModelDims
    shapes: dict[str, tuple[int, ...]]
    adapter_name: str


def model_shape(config: dict[str, Any]) -> ModelShape:
    cm = cost_model_for(config)
    return ModelShape(cm.dims, dict(cm.shapes), cm.adapter.name)


def device_profile(profile: DeviceProfile, job: PlanJob, cost_model: CostModel) -> RoundBudget:
    """The core fitter's profile: the device's resources plus the job's batch, sequence length, steps, deadline.

    ``ValidationError`` (INVALID_ARGUMENT) for values the fitter refuses (zero bandwidth, negative memory...).
    """
    seq_len = cost_model.image_tokens if cost_model.image_tokens is not None else job.seq_len
    try:
        return RoundBudget(
            train_memory_mb=profile.train_memory_mb, gflops=profile.gflops, up_mbps=profile.up_mbps,
            down_mbps=profile.down_mbps, deadline_s=job.deadline_s, batch_size=job.batch_size, seq_len=seq_len,
            local_steps=max(job.local_steps, 1), infer_memory_mb=profile.infer_memory_mb or None)
    except ValueError as exc:
        raise ValidationError(str(exc), field="profile") from None


def cost_fields(result: FitResult, *, infer: bool) -> dict[str, float]:
    """The raffm.v1.CostEstimate fields of a fit result."""
    c: Costs = result.costs
    t = result.round_time
    return {
        "params": c.params, "wire_bytes": c.wire_bytes,
        "flops_per_sample": c.forward_flops_per_sample if infer else c.flops_per_sample,
        "train_memory_mb": c.train_memory_mb, "infer_memory_mb": c.infer_memory_mb,
        "download_s": t.download_s, "compute_s": t.compute_s, "upload_s": t.upload_s, "est_seconds": t.total_s,
    }


class LocalPlanner:
    """Fits in-process against the version's config (read from the checkpoint store)."""

    def __init__(self, store: CheckpointStore) -> None:
        self._store = store

    def plan(self, profile: DeviceProfile, job: PlanJob, model_version: str, *, infer: bool = False) -> PlanResult:
        cm = cost_model_for(self._store.info(model_version).config)
        try:
            if infer:
                budget = profile.infer_memory_mb or profile.train_memory_mb
                result = fit_inference(cm, budget, batch_size=job.batch_size,
                                       seq_len=None if cm.image_tokens is not None else job.seq_len)
            else:
                result = fit(cm, device_profile(profile, job, cm), wire_dtype=job.wire_dtype)
        except ValidationError:
            raise
        except ValueError as exc:
            raise NoFitError(f"no sub-model of {model_version} fits this profile: {exc}", field="profile") from None
        full = ElasticSpec.full(cm.dims)
        return PlanResult(spec=result.spec, full_spec=full, model_version=model_version,
                          param_fraction=result.costs.params / cm.params(full),
                          cost=cost_fields(result, infer=infer), fit=result)


class GrpcPlanner:
    """Plans through the extractor's Plan RPC (synchronous channel; called from worker threads)."""

    def __init__(self, target: str, token: str, timeout_s: float = 30.0, credentials: Any = None) -> None:
        import grpc

        from raffm.v1 import extractor_pb2_grpc

        self._channel = (grpc.secure_channel(target, credentials) if credentials is not None
                         else grpc.insecure_channel(target))
        self._stub = extractor_pb2_grpc.ExtractorServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout_s

    def plan(self, profile: DeviceProfile, job: PlanJob, model_version: str, *, infer: bool = False) -> PlanResult:
        import grpc

        from raffm.v1 import extractor_pb2

        request = extractor_pb2.PlanRequest(
            profile=profile_to_proto(profile),
            job=extractor_pb2.JobParams(batch_size=job.batch_size, seq_len=job.seq_len,
                                        wire_dtype=wire_dtype_to_proto(job.wire_dtype),
                                        deadline_s=job.deadline_s, local_steps=job.local_steps,
                                        optimizer=job.optimizer),
            model_version=model_version,
            purpose=extractor_pb2.PLAN_PURPOSE_INFER if infer else extractor_pb2.PLAN_PURPOSE_TRAIN,
        )
        try:
            reply = self._stub.Plan(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise NoFitError(exc.details() or "no sub-model fits") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValidationError(exc.details() or "bad profile", field="profile") from None
            raise
        c = reply.cost
        return PlanResult(
            spec=spec_from_proto(reply.spec), full_spec=spec_from_proto(reply.full_spec),
            model_version=reply.model_version, param_fraction=reply.param_fraction,
            cost={k: float(getattr(c, k)) for k in ("params", "wire_bytes", "flops_per_sample", "train_memory_mb",
                                                    "infer_memory_mb", "download_s", "compute_s", "upload_s",
                                                    "est_seconds")},
        )

    def close(self) -> None:
        self._channel.close()
