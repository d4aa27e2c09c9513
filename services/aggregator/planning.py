"""Where the aggregator's plans come from: the extractor's Plan RPC, or the core planner in-process.

The aggregator talks to the extractor only through the contract (``raffm.v1.ExtractorService``); with no extractor
configured it runs :class:`raffm.planning.LocalPlanner` against the same checkpoint store. Either way the answer is
the core fitter's.
"""

from __future__ import annotations

from typing import Any

import grpc

from raffm.checkpoints import CheckpointStore
from raffm.errors import ValidationError
from raffm.planning import LocalPlanner, NoFitError, Planner, PlanJob, PlanResult
from raffm.profile import DeviceProfile
from raffm.proto import cost_from_proto, profile_to_proto, spec_from_proto, wire_dtype_to_proto
from raffm.v1 import extractor_pb2, extractor_pb2_grpc


class GrpcPlanner:
    """Plans through the extractor's Plan RPC (synchronous channel; called from worker threads)."""

    def __init__(self, target: str, token: str, timeout_s: float = 30.0, credentials: Any = None) -> None:
        self._channel = (grpc.secure_channel(target, credentials) if credentials is not None
                         else grpc.insecure_channel(target))
        self._stub = extractor_pb2_grpc.ExtractorServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout_s

    def plan(self, profile: DeviceProfile, job: PlanJob, model_version: str, *, infer: bool = False) -> PlanResult:
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
        return PlanResult(
            spec=spec_from_proto(reply.spec), full_spec=spec_from_proto(reply.full_spec),
            model_version=reply.model_version, param_fraction=reply.param_fraction, cost=cost_from_proto(reply.cost),
        )

    def close(self) -> None:
        self._channel.close()


def planner_for(extractor_target: str, operator_token: str, checkpoints: CheckpointStore) -> Planner:
    """The extractor's Plan RPC when the aggregator knows an extractor, else the core planner in-process."""
    if extractor_target:
        return GrpcPlanner(extractor_target, operator_token)
    return LocalPlanner(checkpoints)
