"""The method as one object: what each device trains, how updates merge, and when the model is re-ordered.

A :class:`Strategy` is pure (state dicts and specs in, state dicts and plans out; no IO). The aggregator drives it
for real rounds and ``bench/bench_fl.py`` drives the very same object in process, so the benchmark measures what
ships. RaFFM's defaults, each chosen by measurement (bench/results, README "The method"):

- **SPP once**, on version 0: the leading heads and FFN neurons are the salient ones, and they stay where they are,
  so a head a small device trained last round is still in its slice this round (re-ranking every round shuffles
  near-tied channels in and out of the small slices).
- **Width, never the residual stream**: sub-models keep the first heads and FFN neurons of every layer at the full
  hidden width (:func:`raffm.fitting.ladder`), so every slice computes (an approximation of) the model's function.
- **Frozen vocabulary embeddings**: on MiniLM they are half the parameters; frozen, they cost no gradient, no
  optimizer state and no upload, and a device keeps them across rounds, so they cross the wire once. So do the other
  input embeddings and the **first layer**, which no gradient then reaches: no activations kept below the second
  layer either, so small devices train wider slices.
- **No nested cuts trained on the devices**: every device trains its own slice on the labels, and a cut of the final
  model is matched to it on unlabelled data before it serves (:class:`raffm.scaling.CutMatcher`, forward passes and
  ridge regression). Over 8 seeds of bench_fl this trained model ended 2.5 pts higher than one whose devices also
  trained the nested cuts (the sandwich rule, option ``nested_fractions``), with a third of the spread, level with
  full FedAvg once served, and its matched cuts 2.1-2.4 pts higher; a cut used as cut, unmatched, falls apart (the
  nested recipe is the choice where no unlabelled data can be had).
- **Updates weighted by the samples trained this round**, folded with coverage-weighted sliced FedAvg.
- **Server momentum 0.5** (FedAvgM): the server steps along the running sum of the rounds' merged updates, which
  damps the round-to-round swings that a non-IID fleet of slices gives the model.

``probe_rounds`` (off by default: over 4 seeds of bench_fl, a probe round in place of a fine-tuning round ended 4 pts
lower, and one added before the four 1.6 pts lower) makes the first rounds linear-probe rounds, as LP-FT (Kumar et al.
2022) and FedNCM (Legate et al. 2023) fit the head before fine-tuning: every device trains only the freshly initialised
task head on its slice's frozen features (forward passes and a head-sized upload), so no random head's gradients reach
the pretrained body. The body does not change in such a round, so a device keeps it and does not download it again; the
server's momentum starts with the first fine-tuning round.

``lora_ranks`` (off by default) turns rounds into federated LoRA (:mod:`raffm.lora_fed`): every device trains
low-rank adapters on its frozen slice, at the largest rank of the ladder that fits its budget, and the server folds
the adapters' products into the merged global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from raffm.aggregation import MODES, Mode, SlicedFedAvg
from raffm.costs import CostModel
from raffm.fitting import DEFAULT_HEADROOM, FitResult, RoundBudget, fit, ladder, round_time, width_spec
from raffm.lora import DEFAULT_TARGETS, adapter_shapes, target_weight_names
from raffm.recipe import Recipe
from raffm.slicing import SlicePlan, TensorSlice, nested
from raffm.spec import ElasticSpec
from raffm.spp import prioritize_state

Ordering = Literal["once", "every_round", "never"]
ORDERINGS: tuple[Ordering, ...] = ("once", "every_round", "never")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Strategy:
    """One federated method. ``heterogeneous=False`` is full-model FedAvg: a device that cannot train the whole model
    gets nothing (capable-only), unless its profile pretends otherwise (the ``fedavg_all`` upper bound of the bench).

    ``ordering``: SPP on version 0 only (``once``), on every new version (``every_round``), or not at all (``never``,
    HeteroFL's static slices). ``nested_fractions`` (none by default; the sandwich recipe is ``(0.25, 0.5, 0.75)``):
    the width fractions (of the heads; FFN in proportion) trained as nested cuts, each distilled from the device's
    own spec in the same step, by every device whose own spec is wider. ``sampled``, ``distill``,
    ``prior_correction`` and ``dropout``: see :class:`Recipe`.
    ``checkpointing``: a device may trade compute for memory with activation checkpointing when that lets it
    train a larger spec. ``frozen_layers`` k > 0: the input embeddings and the first k layers (at most all but the
    last) stay as pretrained on every device: no gradient flows below layer k, so no activations are kept there;
    never uploaded, and cached by the device across rounds like the frozen vocabulary. LoRA recipes put adapters on
    every target layer. ``probe_rounds`` k: rounds 1..k of a classification job train the task head only
    (:meth:`probe_recipe`), at ``probe_lr_scale`` x the job's learning rate. ``server_distill_steps`` n > 0: after
    every merge the server trains the new version's cuts for n steps to match its logits on unlabelled server data
    (:func:`raffm.training.distill_cuts`; the job's ``distill_data``), at ``server_distill_lr_scale`` x the job's
    learning rate, with its batch size.
    """

    name: str = "raffm"
    heterogeneous: bool = True
    ordering: Ordering = "once"
    freeze_vocab: bool = True
    nested_fractions: tuple[float, ...] = ()
    sampled: int = 1
    distill: float = 1.0
    distill_hidden: float = 0.0
    prior_correction: float = 0.0
    dropout: bool = True
    checkpointing: bool = True
    frozen_layers: int = 0
    probe_rounds: int = 0
    probe_lr_scale: float = 10.0
    aggregation: Mode = "coverage"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_distill_steps: int = 0
    server_distill_lr_scale: float = 0.5
    # Federated LoRA: the rank ladder (empty: plain fine-tuning), the target modules (empty: the architecture's
    # defaults, raffm.lora.DEFAULT_TARGETS) and alpha (scaling alpha / rank).
    lora_ranks: tuple[int, ...] = ()
    lora_targets: tuple[str, ...] = ()
    lora_alpha: float = 16.0
    # The precision a LoRA round's frozen base slice travels down at (the device computes with it in float32): the
    # base is nearly all of a LoRA job's bytes, and it crosses the wire in the device's first round.
    lora_base_dtype: str = "float16"

    def __post_init__(self) -> None:
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.lora_ranks):
            raise ValueError(f"lora_ranks {self.lora_ranks!r}: every rank must be an integer >= 1")
        if self.lora_ranks:
            # The server keeps version 0 as every device's base and sends the rest of the model as adapters; a
            # re-ordered version would no longer line up with version 0's channels.
            if self.ordering == "every_round":
                raise ValueError("LoRA rounds need a stable channel order: use ordering 'once' or 'never'")
            Recipe(lora_rank=max(self.lora_ranks), lora_targets=self.lora_targets or ("x",),
                   lora_alpha=self.lora_alpha)  # validates alpha and targets
        if self.lora_base_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"lora_base_dtype is {self.lora_base_dtype!r}; choose float32, float16 or bfloat16")
        if self.ordering not in ORDERINGS:
            raise ValueError(f"ordering is {self.ordering!r}; choose one of {', '.join(ORDERINGS)}")
        if self.aggregation not in MODES:
            raise ValueError(f"aggregation is {self.aggregation!r}; choose one of {', '.join(MODES)}")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"server_momentum is {self.server_momentum}; it must be in [0, 1)")
        if self.server_momentum and self.ordering == "every_round":
            raise ValueError("server momentum needs a stable channel order: use ordering 'once' or 'never'")
        if isinstance(self.frozen_layers, bool) or not isinstance(self.frozen_layers, int) or self.frozen_layers < 0:
            raise ValueError(f"frozen_layers is {self.frozen_layers!r}; it must be an integer >= 0")
        if isinstance(self.probe_rounds, bool) or not isinstance(self.probe_rounds, int) or self.probe_rounds < 0:
            raise ValueError(f"probe_rounds is {self.probe_rounds!r}; it must be an integer >= 0")
        if any(not 0 < f < 1 for f in self.nested_fractions):
            raise ValueError(f"nested_fractions {self.nested_fractions}: every fraction must be in (0, 1)")
        steps = self.server_distill_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"server_distill_steps is {steps!r}; it must be an integer >= 0")
        if steps and (not self.nested_fractions or self.lora_ranks):
            raise ValueError("server_distill_steps distils the nested cuts: it needs nested_fractions (e.g. "
                             "[0.25, 0.5, 0.75]) and no lora_ranks")
        Recipe(sampled=self.sampled, distill=self.distill, distill_hidden=self.distill_hidden,
               prior_correction=self.prior_correction, lr_scale=self.probe_lr_scale)  # validates them
        if not (self.server_distill_lr_scale > 0 and math.isfinite(self.server_distill_lr_scale)):
            raise ValueError(f"server_distill_lr_scale is {self.server_distill_lr_scale}; it must be a positive number")

    # -- versions -----------------------------------------------------------------------------------------------------

    def initial(self, state: Mapping[str, torch.Tensor], cost_model: CostModel) -> State:
        """Version 0 from the pretrained model: salience-ordered unless ``ordering`` is ``never``."""
        if self.ordering == "never":
            return dict(state)
        return prioritize_state(state, cost_model.adapter, cost_model.dims)

    def next_version(
        self, merged: Mapping[str, torch.Tensor], cost_model: CostModel, *, previous: Mapping[str, torch.Tensor]
        | None = None, momentum: Mapping[str, torch.Tensor] | None = None, round_index: int = 0,
    ) -> tuple[State, State | None]:
        """The next version from round ``round_index``'s merged state, and the server's momentum after it.

        With ``server_momentum`` m > 0 (FedAvgM) the round's step ``merged - previous`` feeds a momentum buffer
        ``b = m * b + step`` and the version is ``previous + b``; then re-ordered only with ``every_round``. A probe
        round's step (the head alone, at a larger learning rate) is taken as it is and starts no momentum: fine-tuning
        starts its own, as LP-FT starts a fresh optimizer.
        """
        state = dict(merged)
        buffer: State | None = None
        if self.server_momentum and not self.is_probe_round(round_index):
            if previous is None:
                raise ValueError("server momentum needs the previous version")
            buffer = {}
            for name, new in merged.items():
                if not new.is_floating_point():
                    continue
                step = new.double() - previous[name].double()
                if momentum is not None:
                    step = step + self.server_momentum * momentum[name]
                buffer[name] = step
                # Where nothing moves, the previous value bit for bit (x + 0.0 turns -0.0 into +0.0, and a frozen
                # tensor that changes its bits is downloaded again by every device).
                old = previous[name]
                state[name] = torch.where(step != 0, (old.double() + step).to(new.dtype), old)
        if self.ordering == "every_round":
            state = prioritize_state(state, cost_model.adapter, cost_model.dims)
        return state, buffer

    # -- assignments --------------------------------------------------------------------------------------------------

    def cuts(self, cost_model: CostModel) -> tuple[ElasticSpec, ...]:
        """The nested cuts of the global model this strategy trains, smallest first (whole heads, at least one)."""
        heads = cost_model.dims.heads
        counts = sorted({max(1, round(f * heads)) for f in self.nested_fractions} - {heads})
        return tuple(width_spec(cost_model.dims, h) for h in counts)

    def recipe_for(self, spec: ElasticSpec, cost_model: CostModel, *, checkpointing: bool = False) -> Recipe:
        """The recipe of a device training ``spec``: frozen vocabulary (stored at half precision) and ``frozen_layers``,
        and the strategy's cuts nested in ``spec``."""
        plan = cost_model.plan(spec)
        frozen = cost_model.adapter.vocab_tensors(plan) if self.freeze_vocab else frozenset()
        layers = min(self.frozen_layers, spec.depth - 1)  # the last layer always trains
        frozen |= {n for n in plan if cost_model.adapter.below(n, layers)}
        # Half precision only for a table that is looked up: a tied LM head multiplies fp32 activations by it.
        half = bool(cost_model.adapter.vocab_tensors(frozen)) and not cost_model.tied_head
        inner = tuple(c for c in self.cuts(cost_model) if nested(c, spec) and c != spec and c.depth == spec.depth)
        return Recipe(frozen=frozen, nested=inner, sampled=self.sampled, distill=self.distill,
                      frozen_dtype="float16" if half else "float32", checkpointing=checkpointing,
                      distill_hidden=self.distill_hidden if inner else 0.0, prior_correction=self.prior_correction,
                      dropout=self.dropout)

    def server_distill_recipe(self, cost_model: CostModel) -> Recipe:
        """The recipe of the server's distillation step (:func:`raffm.training.distill_cuts`): the whole model with
        every cut of the strategy, frozen where the devices' recipes freeze and above the last layer (the pooler and
        the task head, which every cut shares whole: a step on them moves every size's decision threshold)."""
        full = ElasticSpec.full(cost_model.dims)
        recipe = self.recipe_for(full, cost_model)
        adapter = cost_model.adapter
        above = {n for n in cost_model.plan(full) if adapter.layer_of(n) is None and not adapter.below(n, 1)}
        return replace(recipe, frozen=recipe.frozen | above, prior_correction=0.0,
                       lr_scale=self.server_distill_lr_scale)

    def recipes_for(self, spec: ElasticSpec, cost_model: CostModel) -> tuple[Recipe, ...]:
        """The recipes a device may train ``spec`` with, preferred first: without activation checkpointing (less
        compute), then with it (less memory) when the strategy allows. With ``lora_ranks``: LoRA recipes, the largest
        rank first, every rank without checkpointing before any with it (the fitter takes the first that fits, so a
        device gets the largest rank its budget allows on the largest slice it can train)."""
        if self.lora_ranks:
            targets = self.lora_targets_for(cost_model)
            ranks = sorted(set(self.lora_ranks), reverse=True)
            modes = (False, True) if self.checkpointing else (False,)
            return tuple(replace(self.recipe_for(spec, cost_model, checkpointing=c), nested=(), distill_hidden=0.0,
                                 lora_rank=r, lora_targets=targets, lora_alpha=self.lora_alpha,
                                 base_dtype=self.lora_base_dtype)
                         for c in modes for r in ranks)
        plain = self.recipe_for(spec, cost_model)
        if not self.checkpointing:
            return (plain,)
        return plain, self.recipe_for(spec, cost_model, checkpointing=True)

    def is_probe_round(self, round_index: int) -> bool:
        """Whether round ``round_index`` (1 is the first; 0: no round in particular) is a probe round."""
        return 0 < round_index <= self.probe_rounds

    def probe_recipe(self, spec: ElasticSpec, cost_model: CostModel) -> Recipe | None:
        """The recipe of a probe round for a device training ``spec``: everything but the task head frozen (no nested
        cut: the cuts share the head), at ``probe_lr_scale`` x the learning rate. None where there is no head to
        probe: a causal LM (its head is pretrained), LoRA jobs, a model without a task head."""
        if self.lora_ranks or cost_model.lm_vocab:
            return None
        plan = cost_model.plan(spec)
        head = cost_model.adapter.task_head(plan)
        if not head:
            return None
        return replace(self.recipe_for(spec, cost_model), frozen=frozenset(plan) - head, nested=(), distill_hidden=0.0,
                       lr_scale=self.probe_lr_scale)

    def lora_targets_for(self, cost_model: CostModel) -> tuple[str, ...]:
        """The LoRA target modules: the strategy's, or the architecture's defaults."""
        if self.lora_targets:
            return tuple(self.lora_targets)
        try:
            return DEFAULT_TARGETS[cost_model.adapter.name]
        except KeyError:
            raise ValueError(f"no default LoRA targets for architecture {cost_model.adapter.name!r}; "
                             "set the strategy option lora_targets") from None

    def plan(
        self, cost_model: CostModel, budget: RoundBudget, *, wire_dtype: str = "float32",
        headroom: float = DEFAULT_HEADROOM, round_index: int = 0,
    ) -> FitResult:
        """The largest spec (with its recipe and predicted costs) that a device can train within its ``budget``
        (memory and round deadline) in round ``round_index`` (1 is the first; 0: no round in particular);
        ``ValueError`` saying what is missing when nothing fits. In a probe round the device trains the spec it will
        fine-tune afterwards, with the probe recipe (so the body it downloads now is the one it keeps)."""
        full = ElasticSpec.full(cost_model.dims)
        rungs = ladder(cost_model.dims) if self.heterogeneous else [full]
        result = fit(cost_model, budget, wire_dtype=wire_dtype, headroom=headroom, rungs=rungs,
                     recipes_for=lambda spec: self.recipes_for(spec, cost_model))
        probe = self.probe_recipe(result.spec, cost_model) if self.is_probe_round(round_index) else None
        if probe is None:
            return result
        costs = cost_model.estimate(result.spec, batch_size=budget.batch_size, seq_len=budget.seq_len,
                                    wire_dtype=wire_dtype, recipe=probe)
        return FitResult(result.spec, costs, round_time(costs, budget), probe)

    @staticmethod
    def upload_plan(plan: SlicePlan, recipe: Recipe) -> SlicePlan:
        """The part of a slice plan a device uploads: its trained tensors. With a LoRA recipe, its adapters
        (``<module>.lora_A [r, in]``, ``.lora_B [out, r]`` for every target weight of the slice; each a whole tensor,
        not a block of a global one)."""
        if recipe.lora_rank:
            names = target_weight_names(plan, recipe.lora_targets)
            shapes = adapter_shapes({n: plan[n].sub_shape for n in names}, recipe.lora_rank)
            return {name: TensorSlice(shape=shape, view=shape, keep=shape, sub_shape=shape)
                    for name, shape in shapes.items()}
        return {name: s for name, s in plan.items() if name not in recipe.frozen}

    # -- merging ------------------------------------------------------------------------------------------------------

    def weight(self, samples: int) -> float:
        """An update's weight: the samples it was trained on this round (not the size of the device's data set)."""
        if samples < 1:
            raise ValueError(f"an update trained on {samples} samples cannot be weighted; it must be >= 1")
        return float(samples)

    def aggregator(self, global_state: Mapping[str, torch.Tensor], *, accum_dtype: torch.dtype = torch.float64
                   ) -> SlicedFedAvg:
        """A fresh streaming aggregator for one round over ``global_state``."""
        return SlicedFedAvg(global_state, mode=self.aggregation, server_lr=self.server_lr, accum_dtype=accum_dtype)

    def with_options(self, **changes: object) -> Strategy:
        """A copy with some settings changed (validated; lists, as a job file gives them, become tuples)."""
        known = {f.name for f in fields(Strategy)} - {"name"}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown strategy setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        return replace(self, **values)  # type: ignore[arg-type]


STRATEGIES: dict[str, Strategy] = {
    # Server momentum 0.5 (FedAvgM): over 4 seeds of bench_fl it cut the spread of the final accuracy from 5.2 to 1.2
    # pts and lifted the 25/50/75% cuts by 5/4/2.5 pts. The label-prior correction (tau 1) then lifted the final
    # accuracy by 1.7 pts (0.766, 0.4 pt below full FedAvg) and the quarter cut by 5 pts. Freezing the embeddings and
    # the first layer then moved 10% fewer bytes, let the phone tier train the whole width, and ended at 0.771, level
    # with full FedAvg (bench/results/2026-11-30-fl.md). Without nested cuts on the devices (the cuts matched before
    # they serve), over 8 seeds: 0.777 +- 0.010 as trained, 0.777 +- 0.009 served at the clients' label prior, level
    # with full FedAvg served (0.773 +- 0.014) and 2.5 pts above the nested recipe (bench/results/2026-12-05.md).
    "raffm": Strategy(server_momentum=0.5, prior_correction=1.0, frozen_layers=1),
    # Full-model FedAvg; devices that cannot train the whole model wait.
    "fedavg": Strategy(name="fedavg", heterogeneous=False, freeze_vocab=False, checkpointing=False),
    # The official research code's recipe: SPP on every version, zero-filled deltas divided by the participants.
    "paper": Strategy(name="paper", ordering="every_round", freeze_vocab=False, checkpointing=False,
                      aggregation="paper"),
    # HeteroFL-style static leading slices of a model that is never salience-ordered.
    "heterofl": Strategy(name="heterofl", ordering="never", freeze_vocab=False, checkpointing=False),
}


def strategy_named(name: str) -> Strategy:
    """A preset by name; ``ValueError`` lists them."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}") from None
