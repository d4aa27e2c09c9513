"""The aggregator's gRPC servicer: decode, call one use case, encode."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from raffm.errors import DomainError, ValidationError, excerpt
from raffm.planning import adapter_and_dims
from raffm.proto import (
    cost_to_proto, manifest_from_proto, recipe_to_proto, resume_to_proto, spec_to_proto, wire_dtype_to_proto,
)
from raffm.threshold import label_counts
from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc
from raffm.wire import WireError
from services.aggregator.assignments import Assignment, Wait
from services.aggregator.config import JobConfig
from services.aggregator.coordinator import RoundCoordinator
from services.aggregator.devices import DeviceDirectory
from services.aggregator.reports import header_metrics
from services.aggregator.store import AGGREGATING, CLOSED, FAILED, OPEN, RoundRecord
from services.aggregator.uploads import LateUploadError, UploadRejectedError, UploadSession
from services.common.auth import TokenVerifier, authorize_device, current_principal, reverify

log = logging.getLogger(__name__)
SERVICE = aggregator_pb2.DESCRIPTOR.services_by_name["AggregatorService"]

ROUND_STATES = {OPEN: aggregator_pb2.ROUND_STATE_OPEN, AGGREGATING: aggregator_pb2.ROUND_STATE_AGGREGATING,
                CLOSED: aggregator_pb2.ROUND_STATE_CLOSED, FAILED: aggregator_pb2.ROUND_STATE_FAILED}
JOB_STATES = {"pending": aggregator_pb2.JOB_STATE_PENDING, "running": aggregator_pb2.JOB_STATE_RUNNING,
              "completed": aggregator_pb2.JOB_STATE_COMPLETED, "failed": aggregator_pb2.JOB_STATE_FAILED}
FAILURE_REASONS = {v: k.removeprefix("FAILURE_REASON_").lower() for k, v in aggregator_pb2.FailureReason.items()}


def _ts(epoch: float) -> Timestamp:
    ts = Timestamp()
    if epoch:
        ts.FromNanoseconds(int(epoch * 1e9))
    return ts


def round_to_proto(r: RoundRecord, assigned: int = 0, accepted: int = 0, tiers: list[dict[str, Any]] | None = None,
                   label_counts: list[int] | None = None) -> aggregator_pb2.Round:
    return aggregator_pb2.Round(
        round_id=r.round_id, job_id=r.job_id, index=r.index, state=ROUND_STATES[r.state],
        model_version=r.model_version, result_model_version=r.result_version, opened_at=_ts(r.opened_at),
        deadline=_ts(r.deadline), closed_at=_ts(r.closed_at), quorum=r.quorum, assigned=assigned, accepted=accepted,
        rejected=r.rejected, dropped=r.dropped, bytes_down=r.bytes_down, bytes_up=r.bytes_up,
        mean_train_loss=r.mean_train_loss, full_model_bytes=r.full_model_bytes,
        evaluation=dict(r.evaluation), extensions=r.extensions,
        failures=[aggregator_pb2.RoundFailures(reason=reason, devices=int(f.get("devices", 0)),
                                               detail=str(f.get("detail", "")))
                  for reason, f in sorted(r.failures.items())],
        tiers=[aggregator_pb2.TierCosts(**t) for t in tiers or ()], label_counts=label_counts or [],
    )


TASK_KINDS: dict[str, aggregator_pb2.TaskKind] = {
    "sequence-classification": aggregator_pb2.TASK_KIND_TEXT_CLASSIFICATION,
    "image-classification": aggregator_pb2.TASK_KIND_IMAGE_CLASSIFICATION,
    "causal-lm": aggregator_pb2.TASK_KIND_CAUSAL_LM,
}


def hparams_to_proto(job: JobConfig, seed: int) -> aggregator_pb2.HyperParams:
    return aggregator_pb2.HyperParams(
        local_epochs=job.local_epochs, local_steps=job.local_steps, batch_size=job.batch_size, seq_len=job.seq_len,
        lr=job.lr, fedprox_mu=job.fedprox_mu, wire_dtype=wire_dtype_to_proto(job.wire_dtype),
        weight_decay=job.weight_decay, seed=seed, optimizer=job.optimizer, warmup_steps=job.warmup_steps)


def task_to_proto(job: JobConfig, architecture: str) -> aggregator_pb2.TaskInfo:
    """``architecture``: the adapter name of the job's model (raffm.arch: "bert", "deberta-v2", "opt"...)."""
    return aggregator_pb2.TaskInfo(kind=TASK_KINDS[job.task], dataset=job.dataset, architecture=architecture,
                                   num_labels=0 if job.task == "causal-lm" else job.num_labels,
                                   label_names=job.labels)


def assignment_to_proto(a: Assignment, extractor_target: str, architecture: str) -> aggregator_pb2.Assignment:
    return aggregator_pb2.Assignment(
        round_id=a.round_id, job_id=a.job_id, model_version=a.model_version, spec=spec_to_proto(a.spec),
        hparams=hparams_to_proto(a.job, a.job.seed + a.round_index), deadline=_ts(a.deadline), ticket=a.ticket,
        task=task_to_proto(a.job, architecture), extractor_target=extractor_target,
        predicted=cost_to_proto(a.predicted), round_index=a.round_index, recipe=recipe_to_proto(a.recipe))


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServiceServicer):
    def __init__(self, coordinator: RoundCoordinator, devices: DeviceDirectory, *, extractor_target: str = "",
                 on_change: Callable[[], None] = lambda: None, poll_executor: Executor | None = None,
                 verifier: TokenVerifier | None = None) -> None:
        self.c = coordinator
        self.architecture = adapter_and_dims(coordinator.model.config)[0].name  # every version shares it
        self.devices = devices
        self.verifier = verifier  # asked again before an upload commits: a device revoked meanwhile is refused
        self.extractor_target = extractor_target
        self.on_change = on_change
        # Polls that may get an assignment run on threads of their own: behind the uploads' blocking steps (staging
        # writes, fsync, SQL commits) in the shared default executor, a thousand devices' polls waited seconds when a
        # round's uploads arrived.
        self.poll_executor = poll_executor

    async def PollRound(self, request: aggregator_pb2.PollRequest, context: Any) -> aggregator_pb2.PollReply:
        caller = current_principal()
        device_id = request.device_id or (caller.device_id or "")
        if not device_id:
            raise ValidationError("device_id is required for operator calls", field="device_id")
        authorize_device(caller, device_id)
        loop = asyncio.get_running_loop()
        if not caller.is_operator:
            # Most polls are answered "wait" whatever the registry says about the device (whose token the registry
            # has just vouched for): those need no device lookup, and no thread: the answer is read from memory.
            idle = self.c.poll_idle(device_id)
            if idle is not None:
                return aggregator_pb2.PollReply(wait=aggregator_pb2.Wait(seconds=idle.seconds, reason=idle.reason))
        info = await self.devices.get(device_id)
        result = await loop.run_in_executor(self.poll_executor, self.c.poll, info, device_id)
        if isinstance(result, Wait):
            if result.unfit:
                await self._settle()
            return aggregator_pb2.PollReply(wait=aggregator_pb2.Wait(seconds=result.seconds, reason=result.reason))
        assignment = assignment_to_proto(result, self.extractor_target, self.architecture)
        return aggregator_pb2.PollReply(assignment=assignment)

    async def UploadUpdate(self, request_iterator: AsyncIterator[aggregator_pb2.UploadMessage],
                           context: Any) -> aggregator_pb2.UploadAck:
        caller = current_principal()
        session: UploadSession | None = None
        h: aggregator_pb2.UpdateHeader | None = None
        work: asyncio.Future[Any] | None = None

        def start_in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            # The session's blocking steps (staging writes, sha256, fsync, the commit) run in a thread, one at a time
            # and in order: the event loop keeps receiving (and serving other streams) meanwhile. The session keeps
            # its ticket's claim until the last of them is over (see _end_session).
            nonlocal work
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            return work

        async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
            # Shielded: a cancelled call does not stop work already running in a thread (a commit, a manifest write).
            return await asyncio.shield(start_in_thread(fn, *args))

        async def drain() -> None:
            # The previous chunk's write and hash (errors surface here: a rejection names its chunk).
            if work is not None and not work.done():
                await asyncio.shield(work)
            elif work is not None:
                work.result()

        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("body") != "header":
                raise _rejected("invalid_header", "the first upload message must be the header")
            h = first.header
            metrics = header_metrics(h.metrics)
            session = await in_thread(self.c.begin_upload, h.ticket, caller, int(h.sample_count), metrics)
            assert session is not None
            async for msg in request_iterator:
                kind = msg.WhichOneof("body")
                if kind == "chunk":
                    # Pipelined: this chunk is written and hashed in a thread while the next one is received.
                    await drain()
                    chunk = msg.chunk
                    start_in_thread(session.accept, chunk.tensor, chunk.offset, chunk.data)
                elif kind == "manifest":
                    if session.reassembler is not None:
                        raise _rejected("protocol", "a second manifest arrived")
                    try:
                        manifest = manifest_from_proto(msg.manifest)
                    except WireError as exc:
                        raise _rejected("bad_manifest", str(exc)) from None
                    await drain()
                    await in_thread(session.set_manifest, manifest)
                else:
                    raise _rejected("protocol", f"unexpected {kind or 'empty'} message after the header")
            await drain()
            await reverify(self.verifier)
            result = await in_thread(session.finish)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            cause: Exception = exc
            if isinstance(exc, OSError) and session is not None:
                # The round ended under this stream and took its staging directory along: late, not a server bug.
                try:
                    await asyncio.to_thread(self.c.check_open, session.round_id)
                except LateUploadError as late:
                    exc = late
            reason = getattr(exc, "reason", None) or ("other" if isinstance(exc, DomainError | ValueError) else None)
            if reason is not None:  # anything else is a server bug: INTERNAL, logged by the chassis
                await asyncio.to_thread(
                    self.c.record_rejection, reason, str(exc), ticket=h.ticket if h is not None else b"",
                    round_id=session.round_id if session is not None else None, device=caller.subject)
            if exc is not cause:
                raise exc from None
            raise
        finally:
            _end_session(work, session)
        self.on_change()
        await self._settle()
        return aggregator_pb2.UploadAck(accepted=True, bytes_received=result.bytes_received, round_id=result.round_id,
                                        tensors_received=result.tensors)

    async def QueryUpload(self, request: aggregator_pb2.QueryUploadRequest, context: Any) -> aggregator_pb2.QueryUploadReply:
        state = await asyncio.to_thread(self.c.query_upload, request.ticket, current_principal())
        return aggregator_pb2.QueryUploadReply(
            complete_tensors=state.complete_tensors,
            resume_from=resume_to_proto(state.resume_from) if not state.committed else None,
            bytes_received=state.bytes_received, committed=state.committed)

    async def ReportFailure(self, request: aggregator_pb2.ReportFailureRequest,
                            context: Any) -> aggregator_pb2.ReportFailureReply:
        reason = FAILURE_REASONS.get(request.reason, "other")
        await asyncio.to_thread(self.c.report_failure, request.ticket, current_principal(), reason, request.detail)
        await self._settle()
        return aggregator_pb2.ReportFailureReply()

    async def _settle(self) -> None:
        """When every assignment of the open round has ended, ask the registry who else is online: nobody means no
        progress is possible, and the round is aggregated or failed now instead of at its deadline."""
        if not await asyncio.to_thread(self.c.stalled):
            return
        online = await self.devices.online_ids()
        if await asyncio.to_thread(self.c.settle, online) != "wait":
            self.on_change()

    async def GetJob(self, request: aggregator_pb2.GetJobRequest, context: Any) -> aggregator_pb2.Job:
        current_principal()
        rec = await asyncio.to_thread(self.c.job_record)
        if request.job_id and request.job_id != rec.job_id:
            from raffm.errors import NotFoundError

            raise NotFoundError(f"job {excerpt(request.job_id)} does not exist", field="job_id")
        j = self.c.job
        state: Any = JOB_STATES.get(rec.state, aggregator_pb2.JOB_STATE_UNSPECIFIED)
        return aggregator_pb2.Job(
            job_id=rec.job_id, model=j.model, state=state, num_rounds=j.rounds,
            clients_per_round=j.clients_per_round, quorum=j.quorum, round_deadline_s=j.round_deadline_s,
            aggregation=(aggregator_pb2.AGGREGATION_MODE_PAPER if j.method().aggregation == "paper"
                         else aggregator_pb2.AGGREGATION_MODE_SLICED_FEDAVG),
            server_lr=j.server_lr, server_optimizer="fedavgm" if j.method().server_momentum else "none",
            current_round=rec.current_round,
            model_version=rec.model_version, created_at=_ts(rec.created_at), task=task_to_proto(j, self.architecture),
            hparams=hparams_to_proto(j, j.seed))

    async def GetRound(self, request: aggregator_pb2.GetRoundRequest, context: Any) -> aggregator_pb2.Round:
        current_principal()

        def load() -> aggregator_pb2.Round:
            return self._round(self.c.round_record(request.round_id))

        return await asyncio.to_thread(load)

    async def ListRounds(self, request: aggregator_pb2.ListRoundsRequest, context: Any) -> aggregator_pb2.ListRoundsReply:
        current_principal()
        size = request.page_size or 100
        if not 1 <= size <= 1000:
            raise ValidationError(f"page_size is {size}; it must be between 1 and 1000", field="page_size")
        try:
            offset = int(request.page_token or 0)
        except ValueError:
            raise ValidationError("page_token is not one this server issued", field="page_token") from None

        def load() -> aggregator_pb2.ListRoundsReply:
            rounds = list(reversed(self.c.list_rounds(request.job_id)))
            if request.state:
                rounds = [r for r in rounds if ROUND_STATES[r.state] == request.state]
            page = rounds[offset : offset + size]
            nxt = str(offset + size) if offset + size < len(rounds) else ""
            return aggregator_pb2.ListRoundsReply(
                rounds=[self._round(r) for r in page], next_page_token=nxt)

        return await asyncio.to_thread(load)

    def _round(self, r: RoundRecord) -> aggregator_pb2.Round:
        """A round with what its assignments and accepted updates add up to (read from the round store)."""
        updates = self.c.round_updates(r.round_id)
        return round_to_proto(r, self.c.assigned_count(r.round_id), len(updates), self.c.tier_costs(r.round_id),
                              label_counts(u.metrics.get("label_counts", ()) for u in updates))


def _end_session(work: asyncio.Future[Any] | None, session: UploadSession | None) -> None:
    """Keep what an interrupted upload sent (for a resume) and release its ticket's claim, once no thread works on it
    any more (a session that ``begin_upload`` returns after the call was cancelled included)."""

    def end(_: object = None) -> None:
        if work is not None and work.done() and not work.cancelled():
            work.exception()  # retrieved: a pipelined chunk that failed after the call was cancelled is not logged
        s = session
        if s is None and work is not None and not work.cancelled() and work.exception() is None:
            result = work.result()
            s = result if isinstance(result, UploadSession) else None
        if s is not None:
            s.interrupted()
            s.close()

    if work is not None and not work.done():
        work.add_done_callback(end)
    else:
        end()


def _rejected(reason: str, message: str) -> Exception:
    return UploadRejectedError(reason, message)
