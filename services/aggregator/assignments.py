"""Assignments: who may take part in the open round, which sub-model a device trains and how (the job's strategy
decides, through the planner), the signed ticket that lets it download its slice and upload for it, and what happens
when it gives up.

A polling device gets either a :class:`Wait` (with a reason and a jittered delay) or an :class:`Assignment`.

Closed-loop sizing: a device is planned with its declared profile corrected by its calibration (what its recent
rounds really cost, :mod:`raffm.calibration`), for the work it really does (the samples it trained last round, in
epoch mode) and the time left in the round; its report, when its update is accepted, updates the calibration.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from raffm.calibration import Calibration, CalibrationBook, CalibrationPolicy, corrected_profile, replayed
from raffm.errors import AuthenticationError, PermissionDeniedError, excerpt
from raffm.planning import NoFitError, Planner, PlanJob, PlanResult
from raffm.recipe import Recipe
from raffm.spec import ElasticSpec
from raffm.tickets import Ticket, TicketError, TicketSigner
from services.aggregator.config import JobConfig
from services.aggregator.devices import DEREGISTERED, DeviceInfo
from services.aggregator.lifecycle import OpenRound, Roster
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.reports import build_report, export, observation, stored_observations
from services.aggregator.store import (
    ASSIGNED, DROPPED, OPEN, UPLOADED, AssignmentRecord, JobRecord, RoundRecord, RoundStore,
)
from services.aggregator.uploads import UploadSession
from services.common.auth import Principal

log = logging.getLogger(__name__)

DEFAULT_STEPS = 10  # optimizer steps assumed for a device in epoch mode before it has reported its sample count
# Share of the time left that a plan may fill: the fitter takes the largest spec whose estimate fits, so a plan without
# slack finishes just in time at best; this absorbs the noise of a device's speed from round to round.
DEADLINE_SLACK = 0.15


MAX_FAILURE_DETAIL = 300  # characters of a device's failure detail kept in its round


def describe_failures(failures: dict[str, Any]) -> str:
    """``2 x data: 'the local data has 3 labels; ...'; 1 x out_of_memory: '...'`` for logs and messages."""
    if not failures:
        return "no device reported a failure"
    return "; ".join(f"{f.get('devices', 0)} x {reason}: {f.get('detail', '')!r}" for reason, f in sorted(
        failures.items(), key=lambda kv: -int(kv[1].get("devices", 0))))


class TicketRejectedError(AuthenticationError):
    reason = "bad_ticket"
    default_hint = "present the ticket from your latest assignment, unmodified"


class WrongDeviceError(PermissionDeniedError):
    reason = "wrong_device"


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str
    unfit: bool = False  # no sub-model of the round fits the device: it cannot take part


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
    recipe: Recipe


class Assigner:
    """Gates, plans and records assignments for one job; verifies the tickets it signed."""

    def __init__(self, job: JobConfig, rounds: RoundStore, planner: Planner, signer: TicketSigner,
                 metrics: AggregatorMetrics, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self.job, self.rounds, self.planner, self.signer, self.metrics = job, rounds, planner, signer, metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self.calibrations = CalibrationBook(CalibrationPolicy(half_life_s=job.calibration_half_life_s),
                                            enabled=job.calibrate)
        self._restored = False

    def wait(self, reason: str) -> Wait:
        """Poll again after the job's wait, jittered so a fleet does not poll in lockstep."""
        base = self.job.poll_wait_s
        return Wait(seconds=base * (1 + self._rng.uniform(-self.job.poll_jitter, self.job.poll_jitter)), reason=reason)

    def gate(self, record: JobRecord | None, o: OpenRound | None,
             device: DeviceInfo) -> Wait | Assignment | RoundRecord:
        """The open round this device may join now, its assignment again when it holds one and has not uploaded
        (polls are idempotent), or why it must wait."""
        idle = self.idle(record, o, device.device_id, load=True)
        if idle is not None:
            return idle
        assert o is not None and o.roster is not None
        if device.state == DEREGISTERED:
            return self.wait(f"device {device.device_id} is deregistered from the fleet; register again to take part")
        if not device.online:
            return self.wait(f"device {device.device_id} is {device.state} in the registry (no heartbeat within its "
                             "liveness window); send a heartbeat, then poll again")
        if device.device_id in o.roster:  # past idle(): it holds an assignment it has not uploaded
            if o.roster.dropped[device.device_id]:
                return self.wait("already assigned in this round")
            self.metrics.repeated_polls.inc()
            return o.issued[device.device_id]
        return o.record

    def idle(self, record: JobRecord | None, o: OpenRound | None, device_id: str, *, load: bool = False) -> Wait | None:
        """Why this device must wait whatever the registry says about it (no open round, the round is full, or it
        holds no assignment to repeat in it), else None: the reasons :meth:`gate` can give without the device.

        Safe without the coordinator's lock when ``load`` is false: it only reads (a roster not loaded yet gives
        None), and an answer one change behind costs the device one poll interval or the locked path's recheck."""
        if record is None or record.state != "running":
            return self.wait(f"job {self.job.job_id} is {record.state if record else 'not started'}")
        if o is None or o.record.state != OPEN or self._clock() > o.record.deadline:
            return self.wait("no open round")
        roster = self.roster(o) if load else o.roster
        if roster is None:
            return None
        if device_id in roster:
            return self.wait("already assigned in this round") if device_id not in o.issued else None
        if roster.taken >= self.job.clients_per_round:
            return self.wait("round is full")
        return None

    def roster(self, o: OpenRound) -> Roster:
        """Who holds an assignment in the open round (read from the round store once; call under the lock)."""
        if o.roster is None:
            roster = Roster()
            for a in self.rounds.assignments(o.record.round_id):
                roster.add(a.device_id)
                if a.state == DROPPED:
                    roster.drop(a.device_id)
            o.roster = roster
        return o.roster

    def calibration(self, device_id: str) -> Calibration:
        """What this device's reports have taught so far (rebuilt from the round store after a restart)."""
        if not self._restored:
            self._restored = True
            replayed(self.calibrations, stored_observations(self.rounds, self.job.job_id))
        return self.calibrations.calibration(device_id, self._clock())

    def planned_steps(self, cal: Calibration) -> int:
        """Optimizer steps the device will really take: the samples it trained last round when it has reported
        (epoch mode trains the device's whole share), else the job's ``local_steps`` (or a default)."""
        if cal.samples > 0:
            steps = math.ceil(cal.samples / self.job.batch_size)
            return min(steps, self.job.local_steps) if self.job.local_steps else steps
        return self.job.local_steps or DEFAULT_STEPS

    def choose_spec(self, device: DeviceInfo, rnd: RoundRecord) -> PlanResult | Wait:
        """Which sub-model ``device`` trains in ``rnd``, and how: the job strategy's plan for its calibrated profile,
        the work it will really do and the time left (a Wait, logged with its reason, when nothing fits)."""
        job = self.job
        cal = self.calibration(device.device_id)
        steps = self.planned_steps(cal)
        left = rnd.deadline - self._clock()
        # download + compute + upload must fit in what is left once the device's fixed cost of a round is paid
        budget_s = (left - cal.overhead_s) * (1 - DEADLINE_SLACK)
        # A device that has reported a round keeps the frozen tensors in its cache: they are not downloaded again.
        plan_job = PlanJob(batch_size=job.batch_size, seq_len=job.seq_len, wire_dtype=job.wire_dtype,
                           deadline_s=max(budget_s, 0.01), local_steps=steps, optimizer=job.optimizer,
                           holds_frozen=cal.observations > 0, round_index=rnd.index)
        profile = corrected_profile(device.profile, cal)
        try:
            plan = self.planner.plan(profile, plan_job, rnd.model_version)
        except NoFitError as exc:
            reason = "deadline" if "deadline" in str(exc) else "memory"
            self.metrics.unfit.labels(device.tier, reason).inc()
            log.info("no assignment for %s in round %d: nothing fits in %.0f s left (%d steps, calibration %s): %s",
                     device.device_id, rnd.index, left, steps, _factors(cal), exc)
            return replace(self.wait(f"no sub-model fits this device: {exc}"), unfit=True)
        p = device.profile
        basis = {"declared_gflops": p.gflops, "declared_up_mbps": p.up_mbps, "declared_down_mbps": p.down_mbps,
                 "declared_memory_mb": float(p.train_memory_mb), "planned_steps": float(steps),
                 "time_left_s": left, "time_budget_s": budget_s, **{f"calibration_{k}": v for k, v in cal.to_dict().items()}}
        return replace(plan, basis=basis)

    def issue(self, device: DeviceInfo, rnd: RoundRecord, plan: PlanResult, wire_bytes: int,
              o: OpenRound | None = None, *, base_version: str = "") -> Assignment:
        """Sign the ticket and record the assignment (in the open round ``o``'s roster too). ``wire_bytes``: exactly
        the bytes of the slice's tensors in the wire dtype, what one complete download streams (a resumed download
        only streams the rest, so a device moves this much however often its link breaks). ``base_version``: a LoRA
        assignment's frozen base (the ticket tells the extractor)."""
        job = self.job
        now = self._clock()
        ticket = Ticket.create(device_id=device.device_id, job_id=job.job_id, round_id=rnd.round_id,
                               model_version=rnd.model_version, spec=plan.spec, wire_dtype=job.wire_dtype,
                               ttl_s=rnd.deadline - now + job.ticket_grace_s, now=now, tier=device.tier,
                               recipe=plan.recipe, base_version=base_version)
        self.rounds.add_assignment(AssignmentRecord(
            ticket_id=ticket.ticket_id, round_id=rnd.round_id, device_id=device.device_id, tier=device.tier,
            spec=plan.spec.to_dict(), state=ASSIGNED, created_at=now, download_bytes=wire_bytes,
            predicted={**plan.cost, **plan.basis}))
        assignment = Assignment(round_id=rnd.round_id, round_index=rnd.index, job_id=job.job_id,
                                model_version=rnd.model_version, spec=plan.spec, ticket=self.signer.sign(ticket),
                                deadline=rnd.deadline, predicted=dict(plan.cost), job=job, recipe=plan.recipe)
        if o is not None and o.record.round_id == rnd.round_id:
            self.roster(o).add(device.device_id)
            o.issued[device.device_id] = assignment
        self.metrics.assignments.labels(device.tier).inc()
        self.metrics.bytes_down_assigned.labels(device.tier, job.wire_dtype).inc(wire_bytes)
        return assignment

    def uploaded(self, session: UploadSession, upload_bytes: int) -> AssignmentRecord:
        """The assignment of an accepted update, uploaded, with its device's report (to commit, then :meth:`learn`)."""
        now = self._clock()
        a = session.assignment
        report = build_report(session.metrics, sample_count=session.sample_count, upload_bytes=upload_bytes,
                              upload_seconds=session.seconds, round_seconds=now - a.created_at, at=now)
        return replace(a, state=UPLOADED, report=report)

    def learn(self, a: AssignmentRecord) -> None:
        """A committed assignment's report, if it has one, teaches its device's calibration and goes to the metrics."""
        obs = observation(a)
        if obs is not None:
            self.calibration(a.device_id)  # restore first, so this observation lands after the stored ones
            self.calibrations.add(a.device_id, obs)
            export(self.metrics, a, obs)

    def late(self, a: AssignmentRecord, sample_count: int, metrics: dict[str, Any]) -> None:
        """A device's upload came too late: its update is refused, but its report is kept and teaches its
        calibration (a device that always misses would otherwise never be corrected)."""
        a = self.rounds.get_assignment(a.ticket_id) or a  # its state now (the round may have closed meanwhile)
        if a.report or a.state == UPLOADED or sample_count <= 0:
            return  # one report per assignment (a retried late upload says nothing new)
        now = self._clock()
        report = build_report(metrics, sample_count=sample_count, upload_bytes=0, upload_seconds=0.0,
                              round_seconds=now - a.created_at, at=now)
        report["late"] = 1.0
        a = replace(a, report=report)
        self.rounds.save_assignment(a)
        self.learn(a)

    def expired(self, ticket_bytes: bytes, caller: Principal | None, sample_count: int,
                metrics: dict[str, Any]) -> None:
        """An upload whose ticket was refused: when the ticket is genuine and only expired (the device is far past its
        deadline), keep its report as :meth:`late` does."""
        try:
            ticket = self.verify(ticket_bytes, caller, check_expiry=False)
        except (TicketRejectedError, WrongDeviceError):
            return
        a = self.rounds.get_assignment(ticket.ticket_id)
        if a is not None:
            self.late(a, sample_count, metrics)

    def verify(self, ticket_bytes: bytes, caller: Principal | None, *, check_expiry: bool = True) -> Ticket:
        """The ticket, if this aggregator signed it for this job and ``caller`` is its device (or an operator)."""
        try:
            ticket = self.signer.verify(ticket_bytes, check_expiry=check_expiry)
        except TicketError as exc:
            raise TicketRejectedError(str(exc), field="ticket") from None
        if ticket.job_id != self.job.job_id:
            raise TicketRejectedError(f"ticket is for job {excerpt(ticket.job_id)}, this server runs {self.job.job_id!r}")
        if caller is not None and not caller.is_operator and caller.subject != ticket.device_id:
            raise WrongDeviceError(f"ticket belongs to device {excerpt(ticket.device_id)}, not {excerpt(caller.subject)}",
                                   field="ticket")
        return ticket

    def drop(self, ticket: Ticket, reason: str, o: OpenRound | None, detail: str = "") -> None:
        """The device gave up its assignment: a dropout of its round, with its reason and (the latest) detail in the
        round's failures (nothing when it already uploaded or dropped)."""
        a = self.rounds.get_assignment(ticket.ticket_id)
        if a is None or a.state != ASSIGNED:
            return
        self.rounds.save_assignment(replace(a, state=DROPPED))
        if o is not None and o.record.round_id == a.round_id:
            o.issued.pop(a.device_id, None)
            if o.roster is not None:
                o.roster.drop(a.device_id)
        self.metrics.dropouts.labels(reason).inc()
        rnd = self.rounds.get_round(a.round_id)
        if rnd is not None:
            if o is not None and o.record.round_id == rnd.round_id:
                rnd = o.record
            rnd.dropped += 1
            entry = rnd.failures.setdefault(reason, {"devices": 0, "detail": ""})
            entry["devices"] += 1
            entry["detail"] = " ".join(detail.split())[:MAX_FAILURE_DETAIL]
            rnd.failures = dict(rnd.failures)
            self.rounds.save_round(rnd)


def _factors(cal: Calibration) -> str:
    return f"compute x{cal.compute:.2f}, down x{cal.down:.2f}, up x{cal.up:.2f}, memory x{cal.memory:.2f}"
