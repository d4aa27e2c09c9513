"""The round coordinator: one job's use cases as transactions under one lock, around the pieces that decide.

Lifecycle (:mod:`~services.aggregator.lifecycle`), assignments (:mod:`~services.aggregator.assignments`), uploads
(:mod:`~services.aggregator.uploads`) and versions (:mod:`~services.aggregator.versions`) each own one concern; the
coordinator holds the job's current state (job record, global model, open round), takes the lock, and calls them in
order. Its methods are synchronous and thread-safe; the gRPC servicer calls them from worker threads.

The method is the job's :class:`raffm.strategy.Strategy`, and each of its decisions has one call site: the spec and
recipe a device trains (``Assigner.choose_spec``, the strategy's plan), what it uploads (``Strategy.upload_plan``),
an update's weight and its fold into the running sums (``OpenRound.fold``), and the next version
(``Versions.publish``: the strategy's server update and ordering).

Durable state lives in the round store (SQL) and the staging and checkpoint directories; the running sums are always
rebuildable by re-folding the committed updates in commit order, which is what :meth:`RoundCoordinator.start` does
after a crash.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from functools import partial
from typing import Any
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from raffm.aggregation import UpdateRejected
from raffm.checkpoints import CheckpointStore
from raffm.errors import NotFoundError, excerpt
from raffm.lora_fed import adapter_numel
from raffm.planning import Planner, adapter_and_dims
from raffm.recipe import Recipe
from raffm.slicing import SlicePlan
from raffm.spec import ElasticSpec
from raffm.threshold import label_counts
from raffm.tickets import TicketError, TicketSigner
from raffm.wire import WIRE_DTYPES, itemsize
from services.aggregator.assignments import (
    MAX_FAILURE_DETAIL, Assigner, Assignment, TicketRejectedError, Wait, describe_failures,
)
from services.aggregator.config import JobConfig
from services.aggregator.devices import DeviceInfo
from services.aggregator.lifecycle import Lifecycle, OpenRound
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.reports import tier_costs
from services.aggregator.staging import Staging
from services.aggregator.store import (
    AGGREGATING, ASSIGNED, CLOSED, FAILED, OPEN, DuplicateUpdateError, JobRecord, RoundRecord, RoundStore,
    UpdateRecord,
)
from services.aggregator.uploads import (
    DuplicateUploadError, LateUploadError, UploadInProgressError, UploadRejectedError, UploadResult, UploadSession,
    UploadState,
    Dense, downloaded_bytes, export_accepted_bytes, upload_state, with_accepted_bytes,
)
from services.aggregator.versions import Distiller, Evaluator, GlobalModel, InitialModel, Versions, version_name
from services.common.auth import Principal
from services.common.ratelog import RateLimitedLog

log = logging.getLogger(__name__)


class RoundCoordinator:
    def __init__(
        self,
        job: JobConfig,
        *,
        rounds: RoundStore,
        checkpoints: CheckpointStore,
        staging: Staging,
        planner: Planner,
        signer: TicketSigner,
        metrics: AggregatorMetrics,
        initial_model: InitialModel,
        evaluator: Evaluator | None = None,
        distiller: Distiller | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.job = job
        self.rounds, self.staging, self.metrics = rounds, staging, metrics
        self.versions = Versions(job, checkpoints, metrics, initial_model, evaluator,
                                 state_dir=staging.root.parent / "server_state", distiller=distiller)
        self.lifecycle = Lifecycle(job, rounds, staging, metrics, clock)
        self.assigner = Assigner(job, rounds, planner, signer, metrics, clock, rng)
        self._clock = clock
        self._lock = threading.RLock()
        self._record: JobRecord | None = None
        self._model: GlobalModel | None = None
        self._open: OpenRound | None = None
        self._uploading: set[str] = set()  # tickets with an upload stream in progress (one stream per ticket)
        self._rejections = RateLimitedLog(log)  # per reason: a client can cause rejections at will
        self.wire_dtype: torch.dtype = WIRE_DTYPES[job.wire_dtype]

    # -- start-up and recovery ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the job (version 0 = salience-ordered initial model) or resume it, rebuilding an open round."""
        with self._lock:
            record = self.rounds.get_job(self.job.job_id)
            if record is None:
                model = self.versions.create_initial()
                record = JobRecord(job_id=self.job.job_id, config=self.job.to_dict(), state="running",
                                   current_round=0, model_version=model.version, created_at=self._clock())
                self.rounds.save_job(record)
            else:
                model = self.versions.load(record.model_version)
                if record.config != self.job.to_dict():
                    log.warning("job %s restarted with changed settings; using the new ones", self.job.job_id)
                    record.config = self.job.to_dict()
                    self.rounds.save_job(record)
            self._record, self._model = record, model
            if self.lifecycle.strategy.lora_ranks:  # LoRA rounds: version 0 is every device's frozen base
                base = version_name(self.job.job_id, 0)
                self.lifecycle.base = model if model.version == base else self.versions.load(base, config=model.config)
            last = self.rounds.list_rounds(record.job_id)
            current = last[-1] if last else None
            if current is not None and current.state in (OPEN, AGGREGATING):
                if current.model_version != model.version:
                    self._model = self.versions.load(current.model_version, config=model.config)
                self._open = self.lifecycle.rebuild(current, self._model, self.wire_dtype)
            elif record.state == "running":
                self._open = self.lifecycle.open_next(record, model)

    # -- helpers ------------------------------------------------------------------------------------------------------

    @property
    def model(self) -> GlobalModel:
        assert self._model is not None, "start() first"
        return self._model

    def _plan(self, spec: ElasticSpec) -> SlicePlan:
        return self._open.plan(self.model, spec) if self._open is not None else self.model.slice_plan(spec)

    def _slice_bytes(self, spec: ElasticSpec, recipe: Recipe = Recipe()) -> int:
        """Bytes of a complete download: the slice (its frozen tensors at the recipe's precision), and a LoRA recipe's
        adapters."""
        plan = self._plan(spec)
        size = itemsize(self.job.wire_dtype)
        narrow = recipe.download_dtypes(plan, adapter_and_dims(self.model.config)[0].vocab_tensors(plan))
        total = sum(s.numel * (itemsize(narrow[n]) if n in narrow else size) for n, s in plan.items())
        if recipe.lora_rank:
            total += adapter_numel(plan, recipe.lora_targets, recipe.lora_rank) * size
        return total

    def check_open(self, round_id: str) -> None:
        """LateUploadError unless ``round_id`` is the open round and before its deadline."""
        with self._lock:
            self._check_open(round_id)

    def _check_open(self, round_id: str) -> OpenRound:
        o = self._open
        if o is None or o.record.round_id != round_id or o.record.state != OPEN:
            rnd = self.rounds.get_round(round_id)
            state = rnd.state if rnd is not None else "unknown"
            raise LateUploadError(f"round {round_id} is {state}; uploads are no longer accepted")
        if self._clock() > o.record.deadline:
            raise LateUploadError(f"round {round_id} passed its deadline; uploads are no longer accepted")
        return o

    # -- PollRound ----------------------------------------------------------------------------------------------------

    def poll_idle(self, device_id: str) -> Wait | None:
        """The answer to a poll when it does not depend on what the registry says about the device (see
        ``Assigner.idle``); None: look the device up and :meth:`poll`. Takes no lock (while a round's uploads
        commit, the fleet's polls would otherwise queue behind them for seconds) and does no IO: safe to call on
        the event loop."""
        return self.assigner.idle(self._record, self._open, device_id)

    def poll(self, device: DeviceInfo | None, device_id: str) -> Wait | Assignment:
        if device is None:
            raise NotFoundError(f"device {excerpt(device_id)} is not registered", field="device_id")
        with self._lock:
            gate = self.assigner.gate(self._record, self._open, device)
            if isinstance(gate, (Wait, Assignment)):
                return gate
            assert self._open is not None and self._open.roster is not None
            seats = self._open.roster
            seats.fitting.add(device_id)  # a seat held while the fit runs
        try:
            plan = self.assigner.choose_spec(device, gate)  # outside the lock: the planner may be a remote call
        except BaseException:
            with self._lock:
                seats.fitting.discard(device_id)
            raise
        with self._lock:
            seats.fitting.discard(device_id)
            if isinstance(plan, Wait):  # no sub-model fits this device: it cannot take part in this round
                o = self._open
                if o is not None and o.record.round_id == gate.round_id and device_id not in o.unfit:
                    o.unfit.add(device_id)
                    entry = o.record.failures.setdefault("no_fit", {"devices": 0, "detail": ""})
                    entry["devices"] += 1
                    entry["detail"] = plan.reason[:MAX_FAILURE_DETAIL]
                    self.rounds.save_round(o.record)
                return plan
            still = self.assigner.gate(self._record, self._open, device)
            if isinstance(still, (Wait, Assignment)):  # an assignment: a concurrent poll of this device got it
                return still
            base = self.lifecycle.base.version if self.lifecycle.base is not None and plan.recipe.lora_rank else ""
            return self.assigner.issue(device, gate, plan, self._slice_bytes(plan.spec, plan.recipe), self._open,
                                       base_version=base)

    # -- UploadUpdate -------------------------------------------------------------------------------------------------

    def begin_upload(self, ticket_bytes: bytes, caller: Principal | None, sample_count: int,
                     metrics: Mapping[str, Any]) -> UploadSession:
        try:
            ticket = self.assigner.verify(ticket_bytes, caller)
        except TicketRejectedError:
            with self._lock:  # a device far past its deadline: its report still calibrates it
                self.assigner.expired(ticket_bytes, caller, sample_count, dict(metrics))
            raise
        if sample_count <= 0:
            raise UploadRejectedError("invalid_header", f"sample_count is {sample_count}; it must be > 0",
                                      field="header.sample_count")
        counts = metrics.get("label_counts") or []
        if counts and (len(counts) != self.job.num_labels or self.job.task == "causal-lm"):
            raise UploadRejectedError(
                "invalid_header", f"label_counts has {len(counts)} counts; a classifier's update has one per label "
                f"({self.job.num_labels}), a language model's none", field="header.metrics.label_counts")
        with self._lock:
            assignment = self.rounds.get_assignment(ticket.ticket_id)
            if assignment is None:
                raise TicketRejectedError(f"ticket {ticket.ticket_id} was not issued by this aggregator")
            if self.rounds.update_for_ticket(ticket.ticket_id) is not None:
                raise DuplicateUploadError(f"an update for ticket {ticket.ticket_id} was already accepted")
            try:
                o = self._check_open(ticket.round_id)
            except LateUploadError:
                self.assigner.late(assignment, sample_count, dict(metrics))  # a late report still calibrates
                raise
            if ticket.ticket_id in self._uploading:
                raise UploadInProgressError(f"another upload stream for ticket {ticket.ticket_id} is in progress")
            recipe = ticket.training_recipe
            plan = o.strategy.upload_plan(self._plan(ticket.elastic_spec), recipe)
            dense: Dense | None = None
            if recipe.lora_rank:
                if o.base is None:
                    raise UploadRejectedError("bad_manifest", "a LoRA ticket for a job that does not run LoRA rounds",
                                              field="ticket")
                dense = partial(o.lora_dense, self.model, ticket.elastic_spec, recipe, wire_dtype=self.wire_dtype)
            self._uploading.add(ticket.ticket_id)
        try:
            staged = self.staging.upload(ticket.round_id, ticket.ticket_id)
        except BaseException:
            self._release_upload(ticket.ticket_id)
            raise
        return UploadSession(ticket, assignment, plan, staged, sample_count, dict(metrics), o.agg,
                             wire_dtype=self.job.wire_dtype, commit=self.commit,
                             release=lambda: self._release_upload(ticket.ticket_id),
                             on_bytes=self.metrics.bytes_received.labels(assignment.tier).inc, dense=dense)

    def _release_upload(self, ticket_id: str) -> None:
        with self._lock:
            self._uploading.discard(ticket_id)

    def commit(self, session: UploadSession, delta: dict[str, torch.Tensor]) -> UploadResult:
        """Validate, make durable, record, fold. Called by UploadSession.finish once every tensor is verified."""
        t0 = time.perf_counter()
        ticket = session.ticket
        update_tensors, plan, dtype = delta, session.plan, self.wire_dtype
        try:
            if session.dense is not None:  # LoRA: fold the dense update the adapters made
                update_tensors, plan = session.dense(delta)
                dtype = torch.float32
            session.agg.validate(update_tensors, plan, self.lifecycle.strategy.weight(session.sample_count),
                                 dtype=dtype)
        except UpdateRejected as exc:
            raise UploadRejectedError(exc.reason, str(exc)) from None
        # The staged files are this upload's own: make them durable before taking the lock, so that the fsyncs of
        # many concurrent uploads never hold up the polls of a large fleet (they wait for this lock).
        session.staged.sync()
        with self._lock:
            if self.rounds.update_for_ticket(ticket.ticket_id) is not None:
                raise DuplicateUploadError(f"an update for ticket {ticket.ticket_id} was already accepted")
            o = self._check_open(ticket.round_id)
            if o.agg is not session.agg:
                raise LateUploadError(f"round {ticket.round_id} was restarted while this upload was in flight")
            assert session.reassembler is not None  # finish() only commits after the manifest arrived
            nbytes = session.reassembler.bytes_held
            assignment = self.assigner.uploaded(session, nbytes)
            down = downloaded_bytes(assignment, session.metrics.get("download_bytes", 0.0))
            full = self.model.wire_bytes(self.job.wire_dtype)
            record = with_accepted_bytes(o.record, nbytes, down, full)
            if o.accepted + 1 >= record.quorum:
                record.state = AGGREGATING
            try:
                update = self.rounds.commit_update(UpdateRecord(
                    round_id=ticket.round_id, ticket_id=ticket.ticket_id, device_id=ticket.device_id,
                    sample_count=session.sample_count, path=str(session.staged.dir), nbytes=nbytes,
                    metrics=session.metrics, accepted_at=self._clock()), assignment, record)
            except DuplicateUpdateError:
                raise DuplicateUploadError(f"an update for ticket {ticket.ticket_id} was already accepted") from None
            # Durable from here on: a crash after this line re-folds the update at restart.
            o.record = record
            o.fold(update_tensors, plan, update, dtype, validated=True)  # validated above, outside the lock
            o.issued.pop(ticket.device_id, None)
            self.assigner.learn(assignment)
            export_accepted_bytes(self.metrics, assignment.tier, nbytes, down, full, self.job.wire_dtype)
        self.metrics.fold_seconds.observe(time.perf_counter() - t0)
        return UploadResult(round_id=ticket.round_id, bytes_received=nbytes, tensors=len(delta), seq=update.seq)

    def record_rejection(self, reason: str, message: str, *, ticket: bytes = b"", round_id: str | None = None,
                         device: str = "") -> None:
        """Count one rejected upload in the metrics and in a round, and log it (rate-limited per reason).

        The round is the one the ticket names when this aggregator signed the ticket (a late or duplicate upload
        counts in its own, closed, round), else the open round: every rejection is counted once, also those that
        happen before an upload session exists (bad ticket, wrong device, bad header, ...)."""
        round_id = round_id or self._ticket_round(ticket)
        counted = ""
        with self._lock:
            o = self._open
            if o is not None and round_id in (None, o.record.round_id):
                o.record.rejected += 1
                self.rounds.save_round(o.record)
                counted = o.record.round_id
            elif round_id is not None:
                rnd = self.rounds.get_round(round_id)
                if rnd is not None:
                    rnd.rejected += 1
                    self.rounds.save_round(rnd)
                    counted = rnd.round_id
        self.metrics.rejected.labels(reason).inc()
        self._rejections.log(reason, "rejected an upload (%s) from %s for round %s: %s", reason, device or "?",
                             counted or "-", excerpt(message, 300))

    def _ticket_round(self, ticket: bytes) -> str | None:
        """The round a ticket of this job names (expired tickets too), or None when it is not one we signed."""
        if not ticket:
            return None
        try:
            t = self.assigner.signer.verify(ticket, check_expiry=False)
        except (TicketError, ValueError):
            return None
        return t.round_id if t.job_id == self.job.job_id else None

    def query_upload(self, ticket_bytes: bytes, caller: Principal | None) -> UploadState:
        return upload_state(self.rounds, self.staging, self.assigner.verify(ticket_bytes, caller, check_expiry=False))

    def report_failure(self, ticket_bytes: bytes, caller: Principal | None, reason: str, detail: str = "") -> None:
        ticket = self.assigner.verify(ticket_bytes, caller, check_expiry=False)
        with self._lock:
            self.assigner.drop(ticket, reason, self._open, detail)
        log.info("device %s gave up its assignment in round %s (%s): %s", ticket.device_id, ticket.round_id, reason,
                 excerpt(detail, 300))

    def stalled(self) -> bool:
        """True when the open round has fewer updates than its quorum, no outstanding assignment, and has seen a
        device: one that was assigned (and uploaded or gave up) or that fits no sub-model. Whether any other device
        can still take part decides (see :meth:`settle`)."""
        with self._lock:
            o = self._open
            if o is None or o.record.state != OPEN or o.accepted >= o.record.quorum:
                return False
            states = self.rounds.assignment_states(o.record.round_id)
            return bool(states or o.unfit) and all(state != ASSIGNED for _, state in states)

    def settle(self, online: set[str] | None) -> str:
        """Close the open round early when no progress is possible: every assignment ended (uploaded or failed) and
        every online device (``online``; None = unknown) was assigned in it or fits no sub-model. With at least
        ``min_updates`` the round is aggregated now ("aggregate"); with no update at all (every device gave up or
        fits nothing) it fails now ("fail") instead of waiting for its deadline and extensions; otherwise "wait".
        A round holding some updates but fewer than ``min_updates`` waits: failing it would discard them, and a
        device that comes online later (a fleet still registering at the job's start) may complete it; its
        deadline decides."""
        if online is None:
            return "wait"
        with self._lock:
            o = self._open
            if o is None or not self.stalled():
                return "wait"
            rnd = o.record
            assigned = {device for device, _ in self.rounds.assignment_states(rnd.round_id)}
            left = online - assigned - o.unfit
            if left:
                return "wait"
            failed = describe_failures(rnd.failures)
            if o.accepted >= self.job.min_updates:
                rnd.state = AGGREGATING
                self.rounds.save_round(rnd)
                log.warning("round %s: every device that can take part is done (%d update(s)%s); aggregating now "
                            "instead of waiting for the deadline", rnd.round_id, o.accepted,
                            f"; failed: {failed}" if rnd.failures else "")
                return "aggregate"
            if o.accepted:
                return "wait"
            log.warning("round %s: no device that can take part is left (%d assigned, all gave up; %d fit no "
                        "sub-model); failing the round now. The devices said: %s", rnd.round_id, len(assigned),
                        len(o.unfit), failed)
            self._finish(o, FAILED)
            return "fail"

    # -- closing ------------------------------------------------------------------------------------------------------

    def tick(self) -> bool:
        """Apply the deadline policy; True when the open round is ready to be aggregated."""
        with self._lock:
            o = self._open
            if o is None:
                return False
            action = self.lifecycle.at_deadline(o)
            if action == "fail":
                self._finish(o, FAILED)
            return action == "aggregate"

    def close_round(self) -> RoundRecord | None:
        """Aggregate the round (if it is AGGREGATING), write the new version, evaluate, open the next round.

        The new version is computed and written, and evaluated, outside the lock: an AGGREGATING round folds nothing
        more, polls meanwhile are told to wait (no round is open) and late uploads are refused, without waiting for
        the lock while a large version is written to the store; a crash meanwhile re-aggregates to the same version
        at restart (the store's put is idempotent).
        """
        with self._lock:
            o = self._open
            if o is None or o.record.state != AGGREGATING:
                return None
            rnd = o.record
            previous, accepted = self.model, o.accepted
        result = self.versions.publish(rnd.index, previous, o.agg, accepted)
        reported = label_counts(u.metrics.get("label_counts", ()) for u in self.round_updates(rnd.round_id))
        evaluation = self.versions.evaluate(result, reported)
        with self._lock:
            if self._open is not o:
                return None
            rnd.result_version = result.version
            rnd.evaluation = evaluation
            self._model = result
            assert self._record is not None
            self._record.model_version = result.version
            return self._finish(o, CLOSED)

    def _finish(self, o: OpenRound, state: str) -> RoundRecord:
        record = self._record
        assert record is not None
        rnd = self.lifecycle.finish(o, state, record)
        self._open = None
        if record.state == "running":
            self._open = self.lifecycle.open_next(record, self.model)
        return rnd

    # -- status -------------------------------------------------------------------------------------------------------

    def job_record(self) -> JobRecord:
        with self._lock:
            assert self._record is not None
            return replace(self._record)

    def round_record(self, round_id: str) -> RoundRecord:
        with self._lock:
            if self._open is not None and self._open.record.round_id == round_id:
                return replace(self._open.record, evaluation=dict(self._open.record.evaluation))
        rnd = self.rounds.get_round(round_id)
        if rnd is None:
            raise NotFoundError(f"round {excerpt(round_id)} does not exist", field="round_id")
        return rnd

    def round_updates(self, round_id: str) -> list[UpdateRecord]:
        """The round's accepted updates, in commit order."""
        return list(self.rounds.updates(round_id))

    def assigned_count(self, round_id: str) -> int:
        return len(self.rounds.assignment_states(round_id))

    def tier_costs(self, round_id: str) -> list[dict[str, Any]]:
        """Per device tier: the planned slice and memory against the measured peak (:func:`reports.tier_costs`)."""
        return tier_costs(self.rounds.assignments(round_id))

    def list_rounds(self, job_id: str = "") -> list[RoundRecord]:
        if job_id and job_id != self.job.job_id:
            raise NotFoundError(f"job {excerpt(job_id)} does not exist", field="job_id")
        with self._lock:
            rounds = self.rounds.list_rounds(self.job.job_id)
            if self._open is not None:
                rounds = [self._open.record if r.round_id == self._open.record.round_id else r for r in rounds]
            return [replace(r) for r in rounds]
