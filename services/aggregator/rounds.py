"""The aggregator's use cases: rounds, assignments, uploads, sliced FedAvg, recovery.

One ``RoundCoordinator`` runs one job. Its methods are synchronous and thread-safe (one lock guards the open round);
the gRPC servicer calls them from worker threads. Durable state lives in the round store (SQL) and the staging and
checkpoint directories; the in-memory running sums are always rebuildable by re-folding the committed updates in
commit order, which is what :meth:`start` does after a crash.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from raffm.aggregation import SlicedFedAvg, UpdateRejected
from raffm.checkpoints import CheckpointStore
from raffm.planning import NoFitError, Planner, PlanJob, adapter_and_dims, slice_plan_for
from raffm.slicing import SlicePlan
from raffm.spec import ElasticSpec
from raffm.spp import prioritize_state
from raffm.tickets import Ticket, TicketError, TicketSigner
from raffm.reassembly import Reassembler
from raffm.wire import WIRE_DTYPES, Manifest, ResumePoint, WireError, itemsize
from services.aggregator.config import JobConfig
from services.aggregator.devices import DEREGISTERED, DeviceInfo
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.staging import Staging, StagedUpload
from services.aggregator.store import (
    AGGREGATING, ASSIGNED, CLOSED, DROPPED, FAILED, OPEN, UPLOADED, AssignmentRecord, DuplicateUpdateError, JobRecord,
    RoundRecord, RoundStore, UpdateRecord,
)
from services.common.auth import Principal
from raffm.errors import AlreadyExistsError, AuthenticationError, NotFoundError, PermissionDeniedError, PreconditionError, ValidationError

log = logging.getLogger(__name__)

InitialModel = Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]
Evaluator = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Mapping[str, float]]


class UploadRejectedError(ValidationError):
    """A bad update (INVALID_ARGUMENT); ``reason`` is a metrics label and maps to raffm.v1.RejectReason."""

    def __init__(self, reason: str, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason


class LateUploadError(PreconditionError):
    reason = "late"
    default_hint = "the round is closed or past its deadline; poll for a new assignment"


class DuplicateUploadError(AlreadyExistsError):
    reason = "duplicate"
    default_hint = "this ticket's update was already accepted; nothing to resend"


class TicketRejectedError(AuthenticationError):
    reason = "bad_ticket"
    default_hint = "present the ticket from your latest assignment, unmodified"


class WrongDeviceError(PermissionDeniedError):
    reason = "wrong_device"


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str


@dataclass(frozen=True)
class Assignment:
    round_id: str
    round_index: int
    job_id: str
    model_version: str
    spec: ElasticSpec
    ticket: bytes
    deadline: float
    predicted: dict[str, float]
    job: JobConfig


@dataclass(frozen=True)
class UploadResult:
    round_id: str
    bytes_received: int
    tensors: int
    seq: int


@dataclass(frozen=True)
class UploadState:
    committed: bool
    resume_from: ResumePoint
    complete_tensors: list[str]
    bytes_received: int


@dataclass
class _OpenRound:
    record: RoundRecord
    agg: SlicedFedAvg
    accepted: int = 0
    loss_weighted: float = 0.0
    weight: float = 0.0
    plans: dict[str, SlicePlan] = field(default_factory=dict)


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
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.job = job
        self.rounds, self.checkpoints, self.staging = rounds, checkpoints, staging
        self.planner, self.signer, self.metrics = planner, signer, metrics
        self._initial_model, self._evaluator = initial_model, evaluator
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.RLock()
        self._record: JobRecord | None = None
        self._global: dict[str, torch.Tensor] = {}
        self._config: dict[str, Any] = {}
        self._open: _OpenRound | None = None
        self.wire_dtype = WIRE_DTYPES[job.wire_dtype]

    # -- start-up and recovery ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create the job (version 0 = salience-ordered initial model) or resume it, rebuilding an open round."""
        with self._lock:
            record = self.rounds.get_job(self.job.job_id)
            if record is None:
                state, config = self._initial_model()
                state = self._reorder(state, config)
                version = f"{self.job.job_id}-v0"
                self.checkpoints.put(version, state, config, meta={"job": self.job.job_id, "round": 0})
                record = JobRecord(job_id=self.job.job_id, config=self.job.to_dict(), state="running",
                                   current_round=0, model_version=version, created_at=self._clock())
                self.rounds.save_job(record)
                self._global, self._config = state, config
            else:
                info = self.checkpoints.info(record.model_version)
                self._global, self._config = self.checkpoints.load(record.model_version), info.config
                if record.config != self.job.to_dict():
                    log.warning("job %s restarted with changed settings; using the new ones", self.job.job_id)
                    record.config = self.job.to_dict()
                    self.rounds.save_job(record)
            self._record = record
            last = self.rounds.list_rounds(record.job_id)
            current = last[-1] if last else None
            if current is not None and current.state in (OPEN, AGGREGATING):
                self._rebuild(current)
            elif record.state == "running":
                self._open_next_round()

    def _reorder(self, state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        if not self.job.reorder_each_round:
            return state
        adapter, dims = adapter_and_dims(config)
        return prioritize_state(state, adapter, dims, rank_hidden=True)

    def _new_agg(self) -> SlicedFedAvg:
        return SlicedFedAvg(self._global, mode=self.job.aggregation,  # type: ignore[arg-type]
                            server_lr=self.job.server_lr, accum_dtype=getattr(torch, self.job.accum_dtype))

    def _rebuild(self, rnd: RoundRecord) -> None:
        """Re-fold the round's committed updates from disk in commit order (same order = bit-identical sums)."""
        if rnd.model_version != self._record.model_version:  # type: ignore[union-attr]
            self._global = self.checkpoints.load(rnd.model_version)
        self._open = _OpenRound(record=rnd, agg=self._new_agg())
        for update in self.rounds.updates(rnd.round_id):
            assignment = self.rounds.get_assignment(update.ticket_id)
            if assignment is None:
                raise RuntimeError(f"committed update {update.ticket_id} has no assignment; the round store is damaged")
            staged = self.staging.upload(rnd.round_id, update.ticket_id)
            plan = self._plan(ElasticSpec.from_dict(assignment.spec))
            self._open.agg.fold(staged.tensors(), plan, update.sample_count, dtype=self.wire_dtype)
            self._count_accepted(self._open, update)
        log.info("resumed round %s with %d committed update(s)", rnd.round_id, self._open.accepted)
        self.metrics.current_round.set(rnd.index)

    def _open_next_round(self) -> None:
        record = self._record
        assert record is not None
        index = record.current_round + 1
        now = self._clock()
        rnd = RoundRecord(round_id=f"{record.job_id}-r{index}", job_id=record.job_id, index=index, state=OPEN,
                          model_version=record.model_version, opened_at=now, deadline=now + self.job.round_deadline_s,
                          quorum=self.job.quorum)
        self.rounds.add_round(rnd)
        record.current_round = index
        self.rounds.save_job(record)
        self._open = _OpenRound(record=rnd, agg=self._new_agg())
        self.metrics.current_round.set(index)
        log.info("opened round %s from %s", rnd.round_id, rnd.model_version)

    # -- helpers ------------------------------------------------------------------------------------------------------

    def _plan(self, spec: ElasticSpec) -> SlicePlan:
        key = spec.key()
        cache = self._open.plans if self._open is not None else {}
        if key not in cache:
            cache[key] = slice_plan_for(self._config, spec, {n: tuple(t.shape) for n, t in self._global.items()})
        return cache[key]

    def _slice_bytes(self, spec: ElasticSpec) -> int:
        return sum(s.numel for s in self._plan(spec).values()) * itemsize(self.job.wire_dtype)

    def _full_wire_bytes(self) -> int:
        size = itemsize(self.job.wire_dtype)
        return sum(t.numel() * size for t in self._global.values() if t.is_floating_point())

    def _count_accepted(self, open_round: _OpenRound, update: UpdateRecord) -> None:
        open_round.accepted += 1
        loss = float(update.metrics.get("loss", 0.0))
        open_round.loss_weighted += loss * update.sample_count
        open_round.weight += update.sample_count

    def _wait(self, reason: str) -> Wait:
        base = self.job.poll_wait_s
        return Wait(seconds=base * (1 + self._rng.uniform(-self.job.poll_jitter, self.job.poll_jitter)), reason=reason)

    def _verify(self, ticket_bytes: bytes, caller: Principal | None, *, check_expiry: bool = True) -> Ticket:
        try:
            ticket = self.signer.verify(ticket_bytes, check_expiry=check_expiry)
        except TicketError as exc:
            raise TicketRejectedError(str(exc), field="ticket") from None
        if ticket.job_id != self.job.job_id:
            raise TicketRejectedError(f"ticket is for job {ticket.job_id!r}, this server runs {self.job.job_id!r}")
        if caller is not None and not caller.is_operator and caller.subject != ticket.device_id:
            raise WrongDeviceError(f"ticket belongs to device {ticket.device_id!r}, not {caller.subject!r}",
                                   field="ticket")
        return ticket

    def _check_open(self, round_id: str) -> _OpenRound:
        o = self._open
        if o is None or o.record.round_id != round_id or o.record.state != OPEN:
            rnd = self.rounds.get_round(round_id)
            state = rnd.state if rnd is not None else "unknown"
            raise LateUploadError(f"round {round_id} is {state}; uploads are no longer accepted")
        if self._clock() > o.record.deadline:
            raise LateUploadError(f"round {round_id} passed its deadline; uploads are no longer accepted")
        return o

    # -- PollRound ----------------------------------------------------------------------------------------------------

    def poll(self, device: DeviceInfo | None, device_id: str) -> Wait | Assignment:
        if device is None:
            raise NotFoundError(f"device {device_id!r} is not registered", field="device_id")
        with self._lock:
            gate = self._assignable(device)
            if isinstance(gate, Wait):
                return gate
            rnd = gate
        job = self.job
        plan_job = PlanJob(batch_size=job.batch_size, seq_len=job.seq_len, wire_dtype=job.wire_dtype,
                           deadline_s=max(rnd.deadline - self._clock(), 1.0),
                           local_steps=job.local_steps or 10, optimizer=job.optimizer)
        try:
            plan = self.planner.plan(device.profile, plan_job, rnd.model_version)
        except NoFitError as exc:
            return self._wait(f"no sub-model fits this device: {exc}")
        with self._lock:
            gate = self._assignable(device)
            if isinstance(gate, Wait):
                return gate
            now = self._clock()
            ticket = Ticket.create(device_id=device.device_id, job_id=job.job_id, round_id=rnd.round_id,
                                   model_version=rnd.model_version, spec=plan.spec, wire_dtype=job.wire_dtype,
                                   ttl_s=rnd.deadline - now + job.ticket_grace_s, now=now,
                                   tier=device.tier)
            # Exactly the bytes of the slice's tensors in the wire dtype: what one complete download streams (a
            # resumed download only streams the rest, so a device moves this much however often its link breaks).
            wire_bytes = self._slice_bytes(plan.spec)
            self.rounds.add_assignment(AssignmentRecord(
                ticket_id=ticket.ticket_id, round_id=rnd.round_id, device_id=device.device_id, tier=device.tier,
                spec=plan.spec.to_dict(), state=ASSIGNED, created_at=now, download_bytes=wire_bytes))
            self.metrics.assignments.labels(device.tier).inc()
            self.metrics.bytes_down_assigned.labels(device.tier, job.wire_dtype).inc(wire_bytes)
            return Assignment(round_id=rnd.round_id, round_index=rnd.index, job_id=job.job_id,
                              model_version=rnd.model_version, spec=plan.spec, ticket=self.signer.sign(ticket),
                              deadline=rnd.deadline, predicted=dict(plan.cost), job=job)

    def _assignable(self, device: DeviceInfo) -> Wait | RoundRecord:
        record = self._record
        if record is None or record.state != "running":
            return self._wait(f"job {self.job.job_id} is {record.state if record else 'not started'}")
        o = self._open
        if o is None or o.record.state != OPEN or self._clock() > o.record.deadline:
            return self._wait("no open round")
        if device.state == DEREGISTERED:
            return self._wait(f"device {device.device_id} is deregistered from the fleet; register again to take part")
        if not device.online:
            return self._wait(f"device {device.device_id} is {device.state} in the registry (no heartbeat within its "
                              "liveness window); send a heartbeat, then poll again")
        mine = [a for a in self.rounds.assignments(o.record.round_id) if a.device_id == device.device_id]
        if mine:
            return self._wait("already assigned in this round")
        active = [a for a in self.rounds.assignments(o.record.round_id) if a.state != DROPPED]
        if len(active) >= self.job.clients_per_round:
            return self._wait("round is full")
        return o.record

    # -- UploadUpdate -------------------------------------------------------------------------------------------------

    def begin_upload(self, ticket_bytes: bytes, caller: Principal | None, sample_count: int,
                     metrics: Mapping[str, float]) -> UploadSession:
        ticket = self._verify(ticket_bytes, caller)
        if sample_count <= 0:
            raise UploadRejectedError("invalid_header", f"sample_count is {sample_count}; it must be > 0",
                                      field="header.sample_count")
        with self._lock:
            assignment = self.rounds.get_assignment(ticket.ticket_id)
            if assignment is None:
                raise TicketRejectedError(f"ticket {ticket.ticket_id} was not issued by this aggregator")
            if self.rounds.update_for_ticket(ticket.ticket_id) is not None:
                raise DuplicateUploadError(f"an update for ticket {ticket.ticket_id} was already accepted")
            o = self._check_open(ticket.round_id)
            plan = self._plan(ticket.elastic_spec)
        return UploadSession(self, ticket, assignment, plan, self.staging.upload(ticket.round_id, ticket.ticket_id),
                             sample_count, dict(metrics), o.agg)

    def commit(self, session: UploadSession, delta: dict[str, torch.Tensor]) -> UploadResult:
        """Validate, make durable, record, fold. Called by UploadSession.finish once every tensor is verified."""
        t0 = time.perf_counter()
        ticket = session.ticket
        try:
            session.agg.validate(delta, session.plan, session.sample_count, dtype=self.wire_dtype)
        except UpdateRejected as exc:
            raise UploadRejectedError(exc.reason, str(exc)) from None
        with self._lock:
            if self.rounds.update_for_ticket(ticket.ticket_id) is not None:
                raise DuplicateUploadError(f"an update for ticket {ticket.ticket_id} was already accepted")
            o = self._check_open(ticket.round_id)
            if o.agg is not session.agg:
                raise LateUploadError(f"round {ticket.round_id} was restarted while this upload was in flight")
            session.staged.sync()
            assert session.reassembler is not None  # finish() only commits after the manifest arrived
            nbytes = session.reassembler.bytes_held
            try:
                update = self.rounds.add_update(UpdateRecord(
                    round_id=ticket.round_id, ticket_id=ticket.ticket_id, device_id=ticket.device_id,
                    sample_count=session.sample_count, path=str(session.staged.dir), nbytes=nbytes,
                    metrics=session.metrics, accepted_at=self._clock()))
            except DuplicateUpdateError:
                raise DuplicateUploadError(f"an update for ticket {ticket.ticket_id} was already accepted") from None
            # Durable from here on: a crash after this line re-folds the update at restart.
            o.agg.fold(delta, session.plan, session.sample_count, dtype=self.wire_dtype)
            self._count_accepted(o, update)
            assignment = replace(session.assignment, state=UPLOADED)
            self.rounds.save_assignment(assignment)
            rnd = o.record
            rnd.bytes_up += nbytes
            rnd.bytes_down += assignment.download_bytes
            rnd.full_model_bytes += 2 * self._full_wire_bytes()
            if o.accepted >= rnd.quorum:
                rnd.state = AGGREGATING
            self.rounds.save_round(rnd)
            self.metrics.accepted.labels(assignment.tier).inc()
            self.metrics.bytes_up.labels(assignment.tier, self.job.wire_dtype).inc(nbytes)
            self.metrics.bytes_down.labels(assignment.tier, self.job.wire_dtype).inc(assignment.download_bytes)
            self.metrics.full_model_bytes.labels(self.job.wire_dtype).inc(2 * self._full_wire_bytes())
        self.metrics.fold_seconds.observe(time.perf_counter() - t0)
        return UploadResult(round_id=ticket.round_id, bytes_received=nbytes, tensors=len(delta), seq=update.seq)

    def record_rejection(self, reason: str, round_id: str | None = None) -> None:
        self.metrics.rejected.labels(reason).inc()
        with self._lock:
            o = self._open
            if o is not None and round_id == o.record.round_id:
                o.record.rejected += 1
                self.rounds.save_round(o.record)

    def query_upload(self, ticket_bytes: bytes, caller: Principal | None) -> UploadState:
        ticket = self._verify(ticket_bytes, caller, check_expiry=False)
        done = self.rounds.update_for_ticket(ticket.ticket_id)
        if done is not None:
            from raffm.wire import END

            return UploadState(True, END, [], done.nbytes)
        if not self.staging.exists(ticket.round_id, ticket.ticket_id):
            return UploadState(False, ResumePoint(), [], 0)
        staged = self.staging.upload(ticket.round_id, ticket.ticket_id)
        point = staged.resume_point()
        return UploadState(False, point, staged.complete_tensors(), staged.bytes_held())

    def report_failure(self, ticket_bytes: bytes, caller: Principal | None, reason: str) -> None:
        ticket = self._verify(ticket_bytes, caller, check_expiry=False)
        with self._lock:
            a = self.rounds.get_assignment(ticket.ticket_id)
            if a is None or a.state != ASSIGNED:
                return
            self.rounds.save_assignment(replace(a, state=DROPPED))
            self.metrics.dropouts.labels(reason).inc()
            rnd = self.rounds.get_round(a.round_id)
            if rnd is not None:
                if self._open is not None and self._open.record.round_id == rnd.round_id:
                    rnd = self._open.record
                rnd.dropped += 1
                self.rounds.save_round(rnd)

    # -- closing ------------------------------------------------------------------------------------------------------

    def tick(self) -> bool:
        """Apply the deadline policy; True when the open round is ready to be aggregated."""
        with self._lock:
            o = self._open
            if o is None:
                return False
            rnd = o.record
            if rnd.state == AGGREGATING:
                return True
            if rnd.state != OPEN or self._clock() < rnd.deadline:
                return False
            if o.accepted >= self.job.min_updates:
                rnd.state = AGGREGATING
                self.rounds.save_round(rnd)
                return True
            if self.job.on_deadline == "extend" and rnd.extensions < self.job.max_extensions:
                rnd.extensions += 1
                rnd.deadline += self.job.round_deadline_s
                self.rounds.save_round(rnd)
                log.info("round %s extended (%d/%d): %d of %d updates", rnd.round_id, rnd.extensions,
                         self.job.max_extensions, o.accepted, self.job.min_updates)
                return False
            self._finish(o, FAILED)
            return False

    def close_round(self) -> RoundRecord | None:
        """Aggregate the round (if it is AGGREGATING), write the new version, evaluate, open the next round.

        Evaluation runs outside the lock: meanwhile polls are told to wait (no round is open) and late uploads are
        refused, exactly as while aggregating; a crash during it re-aggregates to the same version at restart.
        """
        with self._lock:
            o = self._open
            if o is None or o.record.state != AGGREGATING:
                return None
            rnd = o.record
            result = self._reorder(o.agg.result(), self._config)
            version = f"{self.job.job_id}-v{rnd.index}"
            self.checkpoints.put(version, result, self._config, parent=rnd.model_version,
                                 meta={"job": self.job.job_id, "round": rnd.index, "participants": o.accepted})
        evaluation = self._evaluate(result, version)
        with self._lock:
            if self._open is not o:
                return None
            rnd.result_version = version
            rnd.evaluation = evaluation
            self._global = result
            assert self._record is not None
            self._record.model_version = version
            return self._finish(o, CLOSED)

    def _evaluate(self, state: Mapping[str, torch.Tensor], version: str) -> dict[str, float]:
        if self._evaluator is None or not self.job.evaluate:
            return {}
        try:
            evaluation = {k: float(v) for k, v in self._evaluator(state, self._config).items()}
        except Exception:  # noqa: BLE001 - an evaluation bug must not lose the round
            log.exception("evaluation of %s failed", version)
            return {}
        for name, value in evaluation.items():
            metric, _, size = name.partition("@")  # "accuracy@0.25": metric accuracy, sub-model size 0.25
            self.metrics.eval_metric.labels(metric, size or "full").set(value)
        return evaluation

    def _finish(self, o: _OpenRound, state: str) -> RoundRecord:
        rnd = o.record
        now = self._clock()
        rnd.state, rnd.closed_at = state, now
        rnd.mean_train_loss = o.loss_weighted / o.weight if o.weight else 0.0
        for a in self.rounds.assignments(rnd.round_id):
            if a.state == ASSIGNED:
                self.rounds.save_assignment(replace(a, state=DROPPED))
                rnd.dropped += 1
                self.metrics.dropouts.labels("no_upload").inc()
        self.rounds.save_round(rnd)
        self.metrics.rounds.labels(state).inc()
        self.metrics.round_duration.labels(state).observe(now - rnd.opened_at)
        self.metrics.participants.set(o.accepted)
        record = self._record
        assert record is not None
        if record.current_round >= self.job.rounds:
            record.state = "completed"
        self.rounds.save_job(record)
        self.staging.drop_round(rnd.round_id)
        self._open = None
        log.info("round %s %s: %d update(s), version %s", rnd.round_id, state, o.accepted, record.model_version)
        if record.state == "running":
            self._open_next_round()
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
            raise NotFoundError(f"round {round_id!r} does not exist", field="round_id")
        return rnd

    def accepted_count(self, round_id: str) -> int:
        return len(self.rounds.updates(round_id))

    def assigned_count(self, round_id: str) -> int:
        return len(self.rounds.assignments(round_id))

    def list_rounds(self, job_id: str = "") -> list[RoundRecord]:
        if job_id and job_id != self.job.job_id:
            raise NotFoundError(f"job {job_id!r} does not exist", field="job_id")
        with self._lock:
            rounds = self.rounds.list_rounds(self.job.job_id)
            if self._open is not None:
                rounds = [self._open.record if r.round_id == self._open.record.round_id else r for r in rounds]
            return [replace(r) for r in rounds]


class UploadSession:
    """One UploadUpdate stream: manifest check, chunk reassembly into staging, then commit."""

    def __init__(self, coordinator: RoundCoordinator, ticket: Ticket, assignment: AssignmentRecord,
                 plan: SlicePlan, staged: StagedUpload, sample_count: int, metrics: dict[str, float],
                 agg: SlicedFedAvg) -> None:
        self.coordinator, self.ticket, self.assignment, self.plan = coordinator, ticket, assignment, plan
        self.staged, self.sample_count, self.metrics, self.agg = staged, sample_count, metrics, agg
        self.reassembler: Reassembler | None = None  # type: ignore[assignment]
        self.received = 0

    @property
    def round_id(self) -> str:
        return self.ticket.round_id

    def set_manifest(self, manifest: Manifest) -> ResumePoint:
        """Check names, shapes and dtype against the assignment; returns where chunks must start."""
        dtype = self.coordinator.job.wire_dtype
        expected = set(self.plan)
        got = set(manifest.names)
        if got != expected:
            missing, extra = sorted(expected - got), sorted(got - expected)
            raise UploadRejectedError(
                "bad_manifest", f"manifest tensors differ from the assigned slice: missing {missing[:5]}, "
                f"unexpected {extra[:5]}", field="manifest")
        for meta in manifest.tensors:
            want = self.plan[meta.name].sub_shape
            if meta.shape != want:
                raise UploadRejectedError("bad_manifest", f"tensor {meta.name!r} has shape {meta.shape}; the "
                                          f"assigned slice has {want}", field="manifest")
            if meta.dtype != dtype:
                raise UploadRejectedError("bad_manifest", f"tensor {meta.name!r} is {meta.dtype}; the job's wire "
                                          f"dtype is {dtype}", field="manifest")
        self.staged.save_manifest(manifest)
        start = self.staged.resume_point()
        self.reassembler = Reassembler(manifest, self.staged, start)
        return start

    def accept(self, tensor: str, offset: int, data: bytes) -> None:
        if self.reassembler is None:
            raise UploadRejectedError("protocol", "a chunk arrived before the manifest", field="chunk")
        r = self.reassembler
        if self.received == 0 and offset == 0 and r.bytes_held and tensor == r.manifest.tensors[0].name:
            # A sender may always start over: drop the staged partial upload instead of demanding a resume.
            self.staged.reset()
            self.staged.save_manifest(r.manifest)
            self.reassembler = r = Reassembler(r.manifest, self.staged)
        try:
            r.accept(tensor, offset, data)
        except WireError as exc:
            from raffm.wire import ChecksumError

            raise UploadRejectedError("checksum" if isinstance(exc, ChecksumError) else "protocol", str(exc),
                                      field="chunk") from None
        self.received += len(data)

    def interrupted(self) -> None:
        """The stream broke: keep what arrived (flushed to the OS) for a resume."""
        self.staged.flush()

    def finish(self) -> UploadResult:
        if self.reassembler is None:
            raise UploadRejectedError("protocol", "the upload ended before its manifest", field="manifest")
        try:
            self.reassembler.finish()
        except WireError as exc:
            raise UploadRejectedError("incomplete", str(exc)) from None
        self.staged.flush()
        delta = self.staged.tensors()
        try:
            return self.coordinator.commit(self, delta)
        except UploadRejectedError:
            self.staged.remove()  # a bad update is never kept
            raise
