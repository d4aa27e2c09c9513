"""The extractor's gRPC servicer: decode, call one use case, encode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from raffm.chunkwire import ChunkMessage
from raffm.errors import ValidationError
from raffm.planning import PlanJob, PlanResult
from raffm.profile import profile_from_proto
from raffm.proto import (
    cost_to_proto, manifest_to_proto, recipe_to_proto, resume_from_proto, spec_to_proto, wire_dtype_from_proto,
    wire_dtype_to_proto,
)
from raffm.strategy import strategy_named
from raffm.v1 import extractor_pb2, extractor_pb2_grpc
from raffm.wire import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, iter_chunks
from services.common.auth import current_principal
from services.extractor.slices import SliceService

SERVICE = extractor_pb2.DESCRIPTOR.services_by_name["ExtractorService"]


def plan_to_proto(result: PlanResult) -> extractor_pb2.PlanReply:
    return extractor_pb2.PlanReply(spec=spec_to_proto(result.spec), cost=cost_to_proto(result.cost),
                                   model_version=result.model_version, param_fraction=result.param_fraction,
                                   full_spec=spec_to_proto(result.full_spec), recipe=recipe_to_proto(result.recipe))


class ExtractorServicer(extractor_pb2_grpc.ExtractorServiceServicer):
    def __init__(self, service: SliceService) -> None:
        self.service = service

    async def Plan(self, request: extractor_pb2.PlanRequest, context: Any) -> extractor_pb2.PlanReply:
        job = request.job
        # Unset fields take the protocol's defaults; the wire dtype enum becomes the core's name in the planner.
        plan_job = PlanJob(batch_size=job.batch_size or 16, seq_len=job.seq_len,
                           wire_dtype=wire_dtype_from_proto(job.wire_dtype), deadline_s=job.deadline_s or 600.0,
                           local_steps=job.local_steps or 1, optimizer=job.optimizer or "adamw",
                           holds_frozen=job.holds_frozen)
        infer = request.purpose == extractor_pb2.PLAN_PURPOSE_INFER
        try:
            strategy = strategy_named(request.strategy or "raffm")
        except ValueError as exc:
            raise ValidationError(str(exc), field="strategy") from None
        result = await asyncio.to_thread(self.service.plan, profile_from_proto(request.profile), plan_job,
                                         request.model_version, infer=infer, strategy=strategy)
        return plan_to_proto(result)

    async def DownloadSlice(self, request: extractor_pb2.DownloadRequest,
                            context: Any) -> AsyncIterator[extractor_pb2.SliceMessage | ChunkMessage]:
        caller = current_principal()
        ticket = self.service.verify(request.ticket, caller)
        item = await asyncio.to_thread(self.service.slice_for, ticket)
        chunk_bytes = min(max(request.chunk_bytes or DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
        start = resume_from_proto(request.resume_from if request.HasField("resume_from") else None)
        manifest = item.payload.manifest
        yield extractor_pb2.SliceMessage(manifest=manifest_to_proto(
            manifest, model_version=ticket.model_version, spec=spec_to_proto(ticket.elastic_spec),
            chunk_bytes=chunk_bytes, architecture=item.architecture, wire_dtype=wire_dtype_to_proto(ticket.wire_dtype),
            model_config_json=item.config_json))
        counter = self.service.metrics.bytes_down.labels(ticket.tier or "unknown", ticket.wire_dtype)
        sent = 0
        outcome = "aborted"
        try:
            for chunk in iter_chunks(manifest, item.payload.source, start, chunk_bytes,
                                     skip=frozenset(request.have_sha256)):
                yield ChunkMessage(chunk)  # a view of the cached slice, encoded with one copy (raffm.chunkwire)
                sent += len(chunk.data)
                if sent >= 64 << 20:  # count in batches: the counter is shared across streams
                    counter.inc(sent)
                    sent = 0
            outcome = "resumed" if not start.at_start else "complete"
        finally:
            counter.inc(sent)
            self.service.metrics.downloads.labels(outcome).inc()
