"""Round lifecycle: opening a round, the deadline policy, finishing a round, and rebuilding the open round after a
restart; plus the open round's running sums and how an accepted update is folded into them (as the job's strategy
weights and merges updates).

LoRA rounds (the strategy has ``lora_ranks``): versions stay merged (``W0 + U``, ``W0`` = version 0), a device uploads
the delta of its adapters, and :meth:`OpenRound.lora_dense` turns it into the dense update of its slice's target
weights, ``s (B' A' - B A)`` (:func:`raffm.lora_fed.lora_update`), against the adapters the extractor sent it (computed
again here, bit for bit, from the same seed); that dense update is folded like any other.

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

from raffm.aggregation import SlicedFedAvg, UpdateRejected
from raffm.lora import A_SUFFIX, target_weight_names
from raffm.lora_fed import download_seed, lora_update, start_adapters
from raffm.planning import cost_model_for
from raffm.recipe import Recipe
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
class Roster:
    """Who holds an assignment in a round (device id -> dropped?), how many of them have not dropped, and who is
    being fitted for one right now (a seat each: while a round fills, a thousand polling devices do not all run the
    fit for the last few seats).

    Changed only under the coordinator's lock; a poll may read it without the lock (``Assigner.idle``): a membership
    test and the counts are each read whole, at worst one change behind."""

    dropped: dict[str, bool] = field(default_factory=dict)
    active: int = 0
    fitting: set[str] = field(default_factory=set)

    @property
    def taken(self) -> int:
        return self.active + len(self.fitting)

    def add(self, device_id: str) -> None:
        if self.dropped.get(device_id) is not False:
            self.active += 1
        self.dropped[device_id] = False

    def drop(self, device_id: str) -> None:
        if self.dropped.get(device_id) is False:
            self.active -= 1
        self.dropped[device_id] = True

    def __contains__(self, device_id: object) -> bool:
        return device_id in self.dropped


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
    # Who holds an assignment in this round: loaded from the round store on first use, then kept current by the
    # Assigner (every change happens under the coordinator's lock), so a poll reads no rows.
    roster: Roster | None = None
    # The assignments issued in this round whose update has not arrived (device id -> the assignment, ticket
    # included): a device that lost the reply to its poll (a deadline, a broken link) polls again and gets the same
    # assignment, so the round never waits for a device that never saw its ticket. Memory only: after a restart a
    # repeated poll waits, as the ticket's signature cannot be rebuilt from the store.
    issued: dict[str, Assignment] = field(default_factory=dict)
    unfit: set[str] = field(default_factory=set)  # devices that polled and fit no sub-model of this round
    base: GlobalModel | None = None  # LoRA rounds: version 0, every device's frozen base
    # LoRA: (spec key, rank) -> the adapters the extractor sends for it this round (as the device received them)
    starts: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)

    def plan(self, model: GlobalModel, spec: ElasticSpec) -> SlicePlan:
        """The slice plan of ``spec`` (cached for the round)."""
        key = spec.key()
        if key not in self.plans:
            self.plans[key] = model.slice_plan(spec)
        return self.plans[key]

    def start_adapters(self, model: GlobalModel, spec: ElasticSpec, recipe: Recipe,
                       wire_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The adapters a LoRA device of ``spec`` and ``recipe`` downloaded this round: what the extractor computes
        (:func:`raffm.lora_fed.start_adapters` of its blocks of ``model - base``, from the download's seed), rounded
        to the wire dtype as it was sent (cached for the round)."""
        assert self.base is not None and recipe.lora is not None, "a LoRA round and a LoRA recipe"
        key = (spec.key(), recipe.lora.rank)
        if key not in self.starts:
            plan = self.plan(model, spec)
            targets = target_weight_names(plan, recipe.lora.targets)
            current = {n: plan[n].take(model.state[n]) for n in targets}
            base = {n: plan[n].take(self.base.state[n]) for n in targets}
            seed = download_seed(model.version, self.base.version, spec.key(), recipe.lora.rank, recipe.lora.targets,
                                 recipe.lora.alpha)
            adapters = start_adapters(current, base, recipe.lora.rank, recipe.lora.scaling, seed)
            self.starts[key] = {n: a.to(wire_dtype).to(torch.float32) for n, a in adapters.items()}
        return self.starts[key]

    def lora_dense(self, model: GlobalModel, spec: ElasticSpec, recipe: Recipe, delta: Mapping[str, torch.Tensor],
                   wire_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], SlicePlan]:
        """A LoRA upload (the delta of the device's adapters) as the dense float32 update of its slice's target
        weights, with the plan of those weights. :class:`UpdateRejected` when the adapters are not the ones sent."""
        assert recipe.lora is not None
        start = self.start_adapters(model, spec, recipe, wire_dtype)
        if set(delta) != set(start):
            missing, extra = sorted(set(start) - set(delta)), sorted(set(delta) - set(start))
            raise UpdateRejected("missing_tensor" if missing else "unknown_tensor",
                                 f"the uploaded adapters differ from the ones sent: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
        trained = {n: start[n] + d.to(torch.float32) for n, d in delta.items()}
        dense = lora_update(start, trained, self.plan(model, spec), recipe.lora.scaling)
        plan = self.plan(model, spec)
        return dense, {n: plan[n] for n in dense}

    def fold(self, tensors: Mapping[str, torch.Tensor], plan: SlicePlan, update: UpdateRecord,
             wire_dtype: torch.dtype, *, validated: bool = False) -> None:
        """Fold one committed update into the running sums (weighted as the strategy says) and count it: the same
        call live and when re-folding. ``validated``: :meth:`SlicedFedAvg.validate` already passed on these
        tensors (a live commit validates before it takes the coordinator's lock; a re-fold validates here)."""
        self.agg.fold(tensors, plan, self.strategy.weight(update.sample_count), dtype=wire_dtype, validated=validated)
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
        self.base: GlobalModel | None = None  # LoRA rounds: version 0 (set by the coordinator at start)

    def lora_recipe(self, model: GlobalModel, rank: int) -> Recipe:
        """The LoRA recipe of a rank-``rank`` device of this job (what its ticket said; rebuilt from an upload)."""
        targets = self.strategy.lora_targets_for(cost_model_for(model.config))
        return Recipe(lora_rank=rank, lora_targets=targets, lora_alpha=self.strategy.lora_alpha)

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
        return OpenRound(record=rnd, agg=running_sums(model, self.job, self.strategy), strategy=self.strategy,
                         base=self.base)

    def rebuild(self, rnd: RoundRecord, model: GlobalModel, wire_dtype: torch.dtype) -> OpenRound:
        """Re-fold the round's committed updates from staging in commit order (same order = bit-identical sums)."""
        o = OpenRound(record=rnd, agg=running_sums(model, self.job, self.strategy), strategy=self.strategy,
                      base=self.base)
        for update in self.rounds.updates(rnd.round_id):
            assignment = self.rounds.get_assignment(update.ticket_id)
            if assignment is None:
                raise RuntimeError(f"committed update {update.ticket_id} has no assignment; the round store is damaged")
            tensors = self.staging.upload(rnd.round_id, update.ticket_id).tensors()
            spec = ElasticSpec.from_dict(assignment.spec)
            plan = o.plan(model, spec)
            ranks = {t.shape[0] for n, t in tensors.items() if n.endswith(A_SUFFIX)}
            if ranks and o.base is not None:  # a LoRA upload: its rank is its adapters' (one per upload)
                dense, dense_plan = o.lora_dense(model, spec, self.lora_recipe(model, ranks.pop()), tensors,
                                                 wire_dtype)
                o.fold(dense, dense_plan, update, torch.float32)
                continue
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
