"""Round lifecycle: opening a round, the deadline policy, finishing a round, and rebuilding the open round after a
restart; plus the open round's running sums and how an accepted update is folded into them (as the job's strategy
weights and merges updates).

Only :class:`OpenRound` lives in memory. Rounds, assignments and accepted updates are in the round store and the
updates' tensors in staging, so :meth:`Lifecycle.rebuild` re-folds the committed updates in commit order and a
restarted aggregator resumes with bit-identical sums.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from raffm.aggregation import SlicedFedAvg
from raffm.slicing import SlicePlan
from raffm.spec import ElasticSpec
from raffm.strategy import Strategy
from services.aggregator.config import JobConfig
from services.aggregator.evaluation import describe
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.staging import Staging
from services.aggregator.store import (
    AGGREGATING, ASSIGNED, DROPPED, OPEN, JobRecord, RoundRecord, RoundStore, UpdateRecord,
)
from services.aggregator.versions import GlobalModel

if TYPE_CHECKING:
    from services.aggregator.assignments import Assignment

log = logging.getLogger(__name__)

DeadlineAction = Literal["wait", "aggregate", "fail"]


def running_sums(model: GlobalModel, job: JobConfig, strategy: Strategy) -> SlicedFedAvg:
    """The empty running sums of a round that starts from ``model``, as the strategy merges (coverage-weighted sliced
    FedAvg or the paper's rule, with its server learning rate)."""
    return strategy.aggregator(model.state, accum_dtype=getattr(torch, job.accum_dtype))


@dataclass
class OpenRound:
    """The round that takes updates: its record, the running sums, what its report needs, and its slice plans."""

    record: RoundRecord
    agg: SlicedFedAvg
    strategy: Strategy
    accepted: int = 0
    loss_weighted: float = 0.0
    weight: float = 0.0
    plans: dict[str, SlicePlan] = field(default_factory=dict)
    # Who holds an assignment in this round (device id -> dropped?): loaded from the round store on first use, then
    # kept current by the Assigner (every change happens under the coordinator's lock), so a poll reads no rows.
    roster: dict[str, bool] | None = None
    # The assignments issued in this round whose update has not arrived (device id -> the assignment, ticket
    # included): a device that lost the reply to its poll (a deadline, a broken link) polls again and gets the same
    # assignment, so the round never waits for a device that never saw its ticket. Memory only: after a restart a
    # repeated poll waits, as the ticket's signature cannot be rebuilt from the store.
    issued: dict[str, Assignment] = field(default_factory=dict)
    unfit: set[str] = field(default_factory=set)  # devices that polled and fit no sub-model of this round

    def plan(self, model: GlobalModel, spec: ElasticSpec) -> SlicePlan:
        """The slice plan of ``spec`` (cached for the round)."""
        key = spec.key()
        if key not in self.plans:
            self.plans[key] = model.slice_plan(spec)
        return self.plans[key]

    def fold(self, tensors: Mapping[str, torch.Tensor], plan: SlicePlan, update: UpdateRecord,
             wire_dtype: torch.dtype) -> None:
        """Fold one committed update into the running sums (weighted as the strategy says) and count it: the same
        call live and when re-folding."""
        self.agg.fold(tensors, plan, self.strategy.weight(update.sample_count), dtype=wire_dtype)
        self.accepted += 1
        self.loss_weighted += float(update.metrics.get("loss", 0.0)) * update.sample_count
        self.weight += update.sample_count

    @property
    def mean_train_loss(self) -> float:
        return self.loss_weighted / self.weight if self.weight else 0.0


class Lifecycle:
    """Opens, extends, fails, finishes and rebuilds rounds; every change is written to the round store."""

    def __init__(self, job: JobConfig, rounds: RoundStore, staging: Staging, metrics: AggregatorMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.job, self.rounds, self.staging, self.metrics, self._clock = job, rounds, staging, metrics, clock
        self.strategy = job.method()

    def open_next(self, record: JobRecord, model: GlobalModel) -> OpenRound:
        """Open the job's next round on its current version."""
        index = record.current_round + 1
        now = self._clock()
        rnd = RoundRecord(round_id=f"{record.job_id}-r{index}", job_id=record.job_id, index=index, state=OPEN,
                          model_version=record.model_version, opened_at=now, deadline=now + self.job.round_deadline_s,
                          quorum=self.job.quorum)
        self.rounds.add_round(rnd)
        record.current_round = index
        self.rounds.save_job(record)
        self.metrics.current_round.set(index)
        log.info("opened round %s from %s", rnd.round_id, rnd.model_version)
        return OpenRound(record=rnd, agg=running_sums(model, self.job, self.strategy), strategy=self.strategy)

    def rebuild(self, rnd: RoundRecord, model: GlobalModel, wire_dtype: torch.dtype) -> OpenRound:
        """Re-fold the round's committed updates from staging in commit order (same order = bit-identical sums)."""
        o = OpenRound(record=rnd, agg=running_sums(model, self.job, self.strategy), strategy=self.strategy)
        for update in self.rounds.updates(rnd.round_id):
            assignment = self.rounds.get_assignment(update.ticket_id)
            if assignment is None:
                raise RuntimeError(f"committed update {update.ticket_id} has no assignment; the round store is damaged")
            tensors = self.staging.upload(rnd.round_id, update.ticket_id).tensors()
            plan = o.plan(model, ElasticSpec.from_dict(assignment.spec))
            o.fold(tensors, {name: plan[name] for name in tensors}, update, wire_dtype)  # what was accepted
        log.info("resumed round %s with %d committed update(s)", rnd.round_id, o.accepted)
        self.metrics.current_round.set(rnd.index)
        return o

    def at_deadline(self, o: OpenRound) -> DeadlineAction:
        """Apply the deadline policy: past its deadline, a round with at least ``min_updates`` is aggregated, one with
        fewer is extended (``on_deadline = "extend"``, up to ``max_extensions`` times) or failed."""
        rnd = o.record
        if rnd.state == AGGREGATING:
            return "aggregate"
        if rnd.state != OPEN or self._clock() < rnd.deadline:
            return "wait"
        if o.accepted >= self.job.min_updates:
            rnd.state = AGGREGATING
            self.rounds.save_round(rnd)
            return "aggregate"
        if self.job.on_deadline == "extend" and rnd.extensions < self.job.max_extensions:
            rnd.extensions += 1
            rnd.deadline += self.job.round_deadline_s
            self.rounds.save_round(rnd)
            log.info("round %s extended (%d/%d): %d of %d updates", rnd.round_id, rnd.extensions,
                     self.job.max_extensions, o.accepted, self.job.min_updates)
            return "wait"
        return "fail"

    def finish(self, o: OpenRound, state: str, record: JobRecord) -> RoundRecord:
        """Close (or fail) the round: devices that never delivered are dropouts; the job completes after its last
        round; the round's uncommitted uploads are removed from staging."""
        rnd = o.record
        now = self._clock()
        rnd.state, rnd.closed_at = state, now
        rnd.mean_train_loss = o.mean_train_loss
        for a in self.rounds.assignments(rnd.round_id):
            if a.state == ASSIGNED:
                self.rounds.save_assignment(replace(a, state=DROPPED))
                rnd.dropped += 1
                self.metrics.dropouts.labels("no_upload").inc()
        self.rounds.save_round(rnd)
        self.metrics.rounds.labels(state).inc()
        self.metrics.round_duration.labels(state).observe(now - rnd.opened_at)
        self.metrics.participants.set(o.accepted)
        if record.current_round >= self.job.rounds:
            record.state = "completed"
        self.rounds.save_job(record)
        self.staging.drop_round(rnd.round_id)
        log.info("round %s %s: %d update(s), version %s; %s", rnd.round_id, state, o.accepted, record.model_version,
                 describe(rnd.evaluation))
        return rnd
