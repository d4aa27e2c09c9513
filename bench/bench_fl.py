"""Accuracy per byte: RaFFM against full-model FedAvg, capable-only FedAvg, the paper's rule and HeteroFL-style slices.

Every method sees the same fleet (training-memory tiers), the same Dirichlet split of the Rotten Tomatoes reviews,
the same initial model (MiniLM with a seeded 2-label head), the same local hyper-parameters and the same rounds; only
the method differs. Each method is a :class:`raffm.strategy.Strategy`, the very object the aggregator drives in a real
job: it picks every device's spec and recipe (``Strategy.plan``), weights and merges the updates, and makes the next
version. The bench runs it in process with the product's local training loop (``raffm.training.train_local``):

  raffm            the ``raffm`` strategy on the real budgets
  fedavg_all       the ``fedavg`` strategy with every budget unlimited (the upper baseline: every device can afford it)
  fedavg_capable   the ``fedavg`` strategy on the real budgets: only the devices that can train the whole model
  raffm_paper      the ``paper`` strategy (the official code: SPP every round, zero-fill aggregation)
  heterofl         the ``heterofl`` strategy (static leading slices of a model that is never salience-ordered)
  central          not federated: the ``raffm`` strategy on one device that holds the fleet's pooled data, has no
                   memory limit (the whole model, its nested cuts) and trains as many steps per round as the whole
                   fleet does (a fresh AdamW every round, as on a device): what this recipe reaches with this data
                   and this number of gradient steps when there is no heterogeneity, no label skew and no averaging

Bytes are the tensor payload each round moves at the wire dtype: the slice down (minus the tensors the device
already holds with the same content, as the edge agent's cache skips them) and the trained tensors' delta up;
protobuf framing adds about 0.1% (see ``bench_transfer.py``). After the last round, cuts at 25/50/75/100% of the
forward compute are evaluated from the final models of ``--scaling-methods`` (cut as they are, as the product cuts
them), and the fidelity of each tier's slice of version 0 (hidden-state cosine and prediction agreement with the full
model).

    .venv/bin/python bench/bench_fl.py                  # default size: about an hour per seed... see README
    .venv/bin/python bench/bench_fl.py --quick          # CI smoke: a few minutes
    .venv/bin/python bench/bench_fl.py --json out.json  # also write every figure as JSON
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from raffm.costs import OVERHEAD_MB, CostModel  # noqa: E402
from raffm.data import TextDataset, dirichlet_split  # noqa: E402
from raffm.elastic import extract, plan_for  # noqa: E402
from raffm.fitting import RoundBudget, memory_budget_mb  # noqa: E402
from raffm.report import machine_info  # noqa: E402
from raffm.scaling import DEFAULT_FRACTIONS, fidelity, scaling_table  # noqa: E402
from raffm.spec import ElasticSpec  # noqa: E402
from raffm.strategy import Strategy, strategy_named  # noqa: E402
from raffm.threshold import fit_threshold, fleet_prior, label_counts  # noqa: E402
from raffm.training import LocalConfig, Tokenizer, distill_cuts, evaluate, train_local, with_delta  # noqa: E402
from raffm.wire import WirePayload  # noqa: E402

# method -> (strategy preset, whether budgets are real: False gives every device an unlimited budget)
METHODS: dict[str, tuple[str, bool]] = {
    "raffm": ("raffm", True),
    "fedavg_all": ("fedavg", False),
    "fedavg_capable": ("fedavg", True),
    "raffm_paper": ("paper", True),
    "heterofl": ("heterofl", True),
    "central": ("raffm", False),
}
SCALING_METHODS = ("raffm", "fedavg_all", "central")

# Device tiers: training memory as a multiple of the *full model's* plain fine-tuning memory (every tensor trained)
# above the fixed overhead, so the same fleet shape applies to any model and to every method (for MiniLM at 16 x 48
# tokens: about 155, 247, 357 MiB and ample, close to the tiers of `raffm demo`). Only the last tier can train the
# whole model with plain fine-tuning.
TIERS: dict[str, float] = {"sbc": 0.32, "phone": 0.52, "jetson": 0.76, "server": 8.0}
UNLIMITED_MB = 16 * 2**20


@dataclass(frozen=True)
class Settings:
    clients: int = 8
    rounds: int = 4
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    local_steps: int = 15
    batch_size: int = 16
    seq_len: int = 48
    lr: float = 2e-4
    warmup_steps: int = 0  # local lr warmup at the start of every round (every method alike)
    fedprox_mu: float = 0.0  # FedProx's proximal term in local training (every method alike)
    alpha: float = 2.0  # Dirichlet concentration of the label split (raffm demo's default)
    test_size: int = 400
    max_train: int = 4000  # examples shared by the fleet (0: all the rest)
    # Reviews no method trains on, taken from the end of the shuffled data, that score the final model and its cuts
    # once more: one seed's accuracy on the 400 test reviews has a binomial standard error of about 2 pts, as large
    # as the spread across seeds the methods are judged by; on 400 + 2,000 it is under 1 pt. The per-round test
    # figures and the training data stay as they were without it.
    holdout: int = 2000
    # Unlabelled reviews for the server's distillation step (strategy option server_distill_steps), taken after the
    # fleet's share: no device holds them, and their labels are never read.
    distill_pool: int = 1000
    wire_dtype: str = "float32"
    methods: tuple[str, ...] = tuple(METHODS)
    scaling_methods: tuple[str, ...] = SCALING_METHODS
    fractions: tuple[float, ...] = tuple(DEFAULT_FRACTIONS)
    threads: int = 0  # torch intra-op threads (0: torch's default)
    # Strategy settings for the ``raffm`` method (what the job file's [strategy] table sets), e.g. {"sampled": 0}.
    raffm_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
        if not set(self.scaling_methods) <= set(self.methods):
            raise ValueError("every scaling method must also be run: add it to --methods")
        if self.clients < 1 or self.rounds < 1 or not self.seeds:
            raise ValueError("clients, rounds and seeds must be at least 1")

    def strategy(self, method: str) -> Strategy:
        preset = strategy_named(METHODS[method][0])
        return preset.with_options(**dict(self.raffm_options)) if method == "raffm" else preset


DEFAULT = Settings()
QUICK = Settings(clients=4, rounds=2, seeds=(0,), local_steps=2, lr=1e-4, seq_len=32, test_size=160, max_train=800,
                 holdout=160, fractions=(0.25, 1.0))


@dataclass
class Client:
    index: int
    tier: str
    train_memory_mb: float
    data: TextDataset
    cache: dict[str, bytes] = field(default_factory=dict)  # tensor name -> sha256 of what the device holds

    def profile(self, settings: Settings, *, real_budget: bool) -> RoundBudget:
        return RoundBudget(train_memory_mb=self.train_memory_mb if real_budget else UNLIMITED_MB, gflops=1e4,
                             up_mbps=1e5, down_mbps=1e5, deadline_s=1e5, batch_size=settings.batch_size,
                             seq_len=settings.seq_len, local_steps=settings.local_steps)


@dataclass
class MethodRun:
    method: str
    seed: int
    initial_accuracy: float
    accuracy: list[float] = field(default_factory=list)  # after every round
    bytes_down: list[int] = field(default_factory=list)  # per round
    bytes_up: list[int] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    specs: list[str] = field(default_factory=list)  # per client: the spec it trains ("-" when it sits out)
    params: list[int] = field(default_factory=list)  # per client: the parameters of its slice (0 when it sits out)
    train_seconds: float = 0.0
    scaling: list[dict[str, Any]] = field(default_factory=list)
    holdout_accuracy: float | None = None  # the final model on the test and holdout reviews together
    label_counts: list[int] = field(default_factory=list)  # the clients' data per label, summed over their rounds
    # The final model served at the fleet's label prior (raffm.threshold, fitted on the unlabelled pool) on the test
    # (and holdout) reviews
    served_accuracy: float | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_down) + sum(self.bytes_up)


def tier_of(index: int, clients: int) -> str:
    """Clients are spread evenly over the tiers, smallest first; the last client is always a full-model tier."""
    names = list(TIERS)
    return names[min(len(names) - 1, index * len(names) // clients)]


def tier_budget_mb(fraction: float, full_mb: float) -> float:
    """A training-memory budget that leaves ``fraction`` of the full model's variable memory after the fitter's
    fixed overhead and headroom."""
    return memory_budget_mb(OVERHEAD_MB + fraction * (full_mb - OVERHEAD_MB))


def build_fleet(model: PreTrainedModel, train: TextDataset, settings: Settings, seed: int) -> list[Client]:
    """Budgets from the full model's plain fine-tuning memory; a Dirichlet(alpha) split of ``train``."""
    cm = CostModel.from_model(model)
    full_mb = cm.estimate(ElasticSpec.full(cm.dims), batch_size=settings.batch_size,
                          seq_len=settings.seq_len).train_memory_mb
    parts = dirichlet_split(train.labels, settings.clients, settings.alpha, seed)
    return [Client(i, tier_of(i, settings.clients), tier_budget_mb(TIERS[tier_of(i, settings.clients)], full_mb),
                   train.subset(part)) for i, part in enumerate(parts)]


def download_bytes(client: Client, sub_state: dict[str, torch.Tensor], wire_dtype: str, dtypes: dict[str, str]) -> int:
    """Bytes of the slice the device must download, as the extractor sends it (``dtypes``: the tensors not at
    ``wire_dtype``): tensors whose content it does not hold already (the edge agent keeps the tensors of its last
    slice and skips those whose sha256 the manifest repeats). Updates its cache."""
    floats = {name: t for name, t in sub_state.items() if t.is_floating_point()}
    metas = WirePayload.from_state(floats, wire_dtype, dtypes=dtypes).manifest.tensors
    total = sum(m.nbytes for m in metas if client.cache.get(m.name) != m.sha256)
    client.cache = {m.name: m.sha256 for m in metas}
    return total


def run_method(
    method: str,
    initial: PreTrainedModel,
    fleet: Sequence[Client],
    test: TextDataset,
    tokenizer: Tokenizer,
    settings: Settings,
    seed: int,
    *,
    log: Callable[[str], None] = print,
    name: str = "",
    network: bool = True,
    unlabelled: TextDataset | None = None,
) -> tuple[MethodRun, PreTrainedModel]:
    """``settings.rounds`` rounds of ``method`` from ``initial`` (not modified); returns the run and the final model.
    ``name``: the run's name (default ``method``); ``network=False``: no bytes are counted (the central reference);
    ``unlabelled``: the server's data for a strategy with ``server_distill_steps``."""
    if method == "central":
        data = [c.data for c in fleet]
        pooled = TextDataset([t for d in data for t in d.texts], [y for d in data for y in d.labels], data[0].label_names)
        one = Client(0, "central", UNLIMITED_MB, pooled)
        return run_method("raffm", initial, [one], test, tokenizer,
                          replace(settings, local_steps=settings.local_steps * len(fleet)), seed, log=log,
                          name=method, network=False, unlabelled=unlabelled)
    strategy = settings.strategy(method)
    real_budget = METHODS[method][1]
    model = copy.deepcopy(initial).eval()
    cm = CostModel.from_model(model)
    model.load_state_dict(strategy.initial(model.state_dict(), cm))
    plans = {}
    for client in fleet:
        client.cache = {}
        try:
            plans[client.index] = strategy.plan(cm, client.profile(settings, real_budget=real_budget),
                                                wire_dtype=settings.wire_dtype)
        except ValueError:
            pass  # this device cannot train anything this strategy offers: it sits out
    momentum = None  # the server's (FedAvgM), when the strategy keeps one
    name = name or method
    run = MethodRun(name, seed, initial_accuracy=evaluate(model, test, tokenizer, seq_len=settings.seq_len),
                    specs=[plans[c.index].spec.key() if c.index in plans else "-" for c in fleet],
                    params=[plans[c.index].costs.params if c.index in plans else 0 for c in fleet])
    for rnd in range(settings.rounds):
        started = time.perf_counter()
        agg = strategy.aggregator({k: v.detach() for k, v in model.state_dict().items()})
        down = up = 0
        for client in fleet:
            if client.index not in plans:
                continue
            # the round's plan: the same spec every round, the recipe may differ (a probe round trains the head only)
            fit = strategy.plan(cm, client.profile(settings, real_budget=real_budget), wire_dtype=settings.wire_dtype,
                                round_index=rnd + 1)
            sub = extract(model, fit.spec)
            state = sub.state_dict()
            if network:
                down += download_bytes(client, state, settings.wire_dtype,
                                       fit.recipe.download_dtypes(state, cm.adapter.vocab_tensors(state)))
            config = LocalConfig(batch_size=settings.batch_size, seq_len=settings.seq_len, lr=settings.lr,
                                 local_steps=settings.local_steps, weight_decay=0.0, warmup_steps=settings.warmup_steps,
                                 fedprox_mu=settings.fedprox_mu,
                                 seed=seed * 100_003 + rnd * 1009 + client.index)
            result = train_local(sub, client.data, tokenizer, config, recipe=fit.recipe)
            agg.fold(result.delta, strategy.upload_plan(plan_for(model, fit.spec), fit.recipe),
                     strategy.weight(result.samples))
            up += fit.costs.upload_bytes if network else 0
            run.label_counts = label_counts([run.label_counts, result.label_counts])
            del sub, result
        previous = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state, momentum = strategy.next_version(agg.result(), cm, previous=previous, momentum=momentum,
                                                round_index=rnd + 1)
        model.load_state_dict(state)
        if strategy.server_distill_steps:
            if unlabelled is None:
                raise ValueError("server_distill_steps needs unlabelled server data (--distill-pool)")
            config = LocalConfig(batch_size=settings.batch_size, seq_len=settings.seq_len, lr=settings.lr,
                                 local_steps=strategy.server_distill_steps, weight_decay=0.0, seed=seed * 7 + rnd)
            result = distill_cuts(copy.deepcopy(model), unlabelled, tokenizer, config,
                                  recipe=strategy.server_distill_recipe(cm))
            model.load_state_dict(with_delta(model.state_dict(), result.delta))
        run.train_seconds += time.perf_counter() - started
        run.accuracy.append(evaluate(model, test, tokenizer, seq_len=settings.seq_len))
        run.bytes_down.append(down)
        run.bytes_up.append(up)
        run.participants.append(len(plans))
        log(f"  seed {seed} {name:<15} round {rnd + 1}/{settings.rounds}: accuracy {run.accuracy[-1]:.4f}, "
            f"{(down + up) / 1e6:.1f} MB, {len(plans)} clients, {time.perf_counter() - started:.0f} s")
    return run, model


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize_each(values: Sequence[float | None]) -> dict[str, float] | None:
    """:func:`summarize` where every run has the figure; None where one lacks it."""
    present = [v for v in values if v is not None]
    return summarize(present) if len(present) == len(values) else None


def fleet_record(initial: PreTrainedModel, fleet: Sequence[Client], test: TextDataset, tokenizer: Tokenizer,
                 settings: Settings) -> list[dict[str, Any]]:
    """Per client: tier, budget, data size, and the slice the ``raffm`` strategy gives it, with that slice's fidelity
    to the full model at version 0 (before any training): hidden-state cosine and prediction agreement."""
    strategy = settings.strategy("raffm")
    cm = CostModel.from_model(initial)
    ordered = copy.deepcopy(initial)
    ordered.load_state_dict(strategy.initial(initial.state_dict(), cm))
    full = cm.params(ElasticSpec.full(cm.dims))
    records = []
    for c in fleet:
        record: dict[str, Any] = {"client": c.index, "tier": c.tier, "train_memory_mb": round(c.train_memory_mb, 1),
                                  "examples": len(c.data)}
        try:
            fit = strategy.plan(cm, c.profile(settings, real_budget=True), wire_dtype=settings.wire_dtype)
        except ValueError as exc:
            records.append({**record, "spec": "-", "why": str(exc)})
            continue
        record.update(spec=fit.spec.key(), params=fit.costs.params, param_fraction=fit.costs.params / full,
                      trained_params=fit.costs.trained_params, predicted_mb=round(fit.costs.train_memory_mb, 1),
                      nested=[s.key() for s in fit.recipe.nested], full_model=fit.costs.params == full)
        record.update(fidelity(ordered, extract(ordered, fit.spec), test, tokenizer, seq_len=settings.seq_len))
        records.append(record)
    return records


def run_bench(
    settings: Settings,
    model_factory: Callable[[int], PreTrainedModel],
    data: TextDataset,
    tokenizer: Tokenizer,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every method for every seed. ``model_factory(seed)`` returns the initial global model (head seeded)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    runs: list[MethodRun] = []
    fleets: dict[int, list[dict[str, Any]]] = {}
    for seed in settings.seeds:
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        test = data.subset(order[: settings.test_size])
        rest = order[settings.test_size : len(order) - settings.holdout]
        if len(rest) < max(1, settings.max_train):
            raise ValueError(f"{len(data)} examples leave {len(rest)} for training after --test-size "
                             f"{settings.test_size} and --holdout {settings.holdout}; lower one of them")
        held = data.subset(order[len(order) - settings.holdout :])

        def with_held(test_accuracy: float, held_accuracy: float) -> float:
            """The accuracy on the test and holdout reviews together (the test part is already scored)."""
            return (test_accuracy * len(test) + held_accuracy * len(held)) / (len(test) + len(held))

        train = data.subset(rest[: settings.max_train] if settings.max_train else rest)
        pool = rest[settings.max_train : settings.max_train + settings.distill_pool] if settings.max_train else []
        unlabelled = data.subset(pool) if pool else None
        initial = model_factory(seed)
        fleet = build_fleet(initial, train, settings, seed)
        fleets[seed] = fleet_record(initial, fleet, test, tokenizer, settings)
        log(f"seed {seed}: {len(fleet)} clients, " + ", ".join(
            f"{r['tier']}:{r['train_memory_mb']:.0f}MiB:{r['examples']}ex:{r['spec'][:16]}" for r in fleets[seed]))
        for method in settings.methods:
            run, final = run_method(method, initial, fleet, test, tokenizer, settings, seed, log=log,
                                    unlabelled=unlabelled)
            if not any(s != "-" for s in run.specs):
                raise ValueError(f"no client can train what {method} offers: it has no participants")
            scored = data.subset(order[: settings.test_size] + order[len(order) - settings.holdout :])
            # the label shares of the clients' data, as they reported it
            prior = fleet_prior(run.label_counts) if unlabelled is not None and run.label_counts else None
            if method in settings.scaling_methods:
                # Cut the final version as it is, as the aggregator's evaluation and `raffm demo` do: every strategy
                # salience-orders version 0, and re-ordering a trained version would swap near-tied channels across
                # the very boundaries the nested cuts were trained at.
                # With the unlabelled pool, each cut is also scored matched to the full model on it, and served
                # with its threshold at the clients' label prior: once, on the test and holdout reviews together
                # where there is a holdout (matching takes longer than scoring).
                run.scaling = [asdict(p) for p in
                               scaling_table(final, test, tokenizer, fractions=settings.fractions,
                                             seq_len=settings.seq_len,
                                             unlabelled=None if settings.holdout else unlabelled,
                                             prior=None if settings.holdout else prior)]
                if settings.holdout:
                    for point, more in zip(run.scaling, scaling_table(final, scored, tokenizer,
                                                                      fractions=settings.fractions,
                                                                      seq_len=settings.seq_len,
                                                                      unlabelled=unlabelled, prior=prior)):
                        point["holdout_accuracy"] = more.accuracy
                        point["matched_holdout_accuracy"] = more.matched_accuracy
                        point["served_holdout_accuracy"] = more.served_accuracy
                log(f"  seed {seed} {method:<15} scaling: " + ", ".join(
                    f"{p['flops_fraction']:.2f}->{p['accuracy']:.4f}" + "".join(
                        f" ({key} {p[key]:.4f})" for key in ("holdout_accuracy", "matched_accuracy",
                                                             "matched_holdout_accuracy", "served_accuracy",
                                                             "served_holdout_accuracy") if p.get(key) is not None)
                    for p in run.scaling))
            if unlabelled is not None and prior is not None:  # as `raffm demo` serves its final model
                served = copy.deepcopy(final)
                fit_threshold(served, unlabelled, tokenizer, prior, seq_len=settings.seq_len)
                run.served_accuracy = evaluate(served, scored, tokenizer, seq_len=settings.seq_len)
                log(f"  seed {seed} {method:<15} served at the fleet's label prior, on {len(scored)} reviews: "
                    f"{run.served_accuracy:.4f}")
                del served
            if settings.holdout:
                full = [p["holdout_accuracy"] for p in run.scaling if p["target_fraction"] == 1.0]
                run.holdout_accuracy = full[0] if full else with_held(
                    run.accuracy[-1], evaluate(final, held, tokenizer, seq_len=settings.seq_len))
                log(f"  seed {seed} {method:<15} final accuracy on {len(test) + len(held)} test + holdout reviews: "
                    f"{run.holdout_accuracy:.4f}")
            runs.append(run)
            del final
    return {
        "bench": "bench_fl",
        "settings": {**asdict(settings), "tiers": TIERS},
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
        "fleets": {str(k): v for k, v in fleets.items()},
        "majority": {str(s): _majority(data, settings, s) for s in settings.seeds},
        "runs": [{**asdict(r), "total_bytes": r.total_bytes} for r in runs],
        "summary": summary(runs, settings),
    }


def _majority(data: TextDataset, settings: Settings, seed: int) -> float:
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    labels = [data.labels[i] for i in order[: settings.test_size]]
    return max(labels.count(y) for y in set(labels)) / len(labels)


def summary(runs: Sequence[MethodRun], settings: Settings) -> dict[str, Any]:
    """Per method: final accuracy, per-round accuracy and total bytes over the seeds; scaling per fraction."""
    out: dict[str, Any] = {}
    reference = [r.total_bytes for r in runs if r.method == "fedavg_all"]
    for method in settings.methods:
        mine = [r for r in runs if r.method == method]
        total = summarize([float(r.total_bytes) for r in mine])
        entry: dict[str, Any] = {
            "initial_accuracy": summarize([r.initial_accuracy for r in mine]),
            "final_accuracy": summarize([r.accuracy[-1] for r in mine]),
            "round_accuracy": [summarize([r.accuracy[i] for r in mine]) for i in range(settings.rounds)],
            "total_bytes": total,
            "bytes_vs_fedavg_all": total["mean"] / statistics.fmean(reference) if reference else None,
            "gain_per_gb": summarize([(r.accuracy[-1] - r.initial_accuracy) / (r.total_bytes / 1e9) for r in mine])
            if all(r.total_bytes for r in mine) else None,
            "holdout_accuracy": summarize_each([r.holdout_accuracy for r in mine]),
            "served_accuracy": summarize_each([r.served_accuracy for r in mine]),
        }
        if method in settings.scaling_methods:
            def at(f: float, key: str) -> list[float]:
                return [p[key] for r in mine for p in r.scaling if p["target_fraction"] == f]

            def matched(f: float, key: str) -> dict[str, float] | None:
                values = [p.get(key) for r in mine for p in r.scaling if p["target_fraction"] == f]
                return summarize(values) if values and None not in values else None  # type: ignore[arg-type]

            entry["scaling"] = [
                {"target_fraction": f, "param_fraction": statistics.fmean(at(f, "param_fraction")),
                 "flops_fraction": statistics.fmean(at(f, "flops_fraction")), "accuracy": summarize(at(f, "accuracy")),
                 "holdout_accuracy": summarize(at(f, "holdout_accuracy")) if settings.holdout else None,
                 **{key: matched(f, key) for key in ("matched_accuracy", "matched_holdout_accuracy", "served_accuracy",
                                                     "served_holdout_accuracy")}}
                for f in settings.fractions
            ]
        out[method] = entry
    return out


def _pm(s: dict[str, float], scale: float = 1.0, digits: int = 4) -> str:
    if s["n"] < 2:
        return f"{s['mean'] * scale:.{digits}f}"
    return f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_bench` result."""
    s = result["settings"]
    summ = result["summary"]
    majority = statistics.fmean(result["majority"].values())
    options = f", raffm options {dict(s['raffm_options'])}" if s["raffm_options"] else ""
    options += f", FedProx mu {s['fedprox_mu']}" if s.get("fedprox_mu") else ""
    lines = [
        f"In-process (product strategies and training loop, no gRPC): {s['clients']} clients, {s['rounds']} rounds x "
        f"{s['local_steps']} local steps of {s['batch_size']} x {s['seq_len']} tokens, lr {s['lr']} (warmup "
        f"{s['warmup_steps']} steps), Dirichlet alpha "
        f"{s['alpha']}, seeds {list(s['seeds'])} (mean ± sample std), test {s['test_size']} examples (majority class "
        f"{majority:.4f}), wire {s['wire_dtype']}{options}.",
        "",
        f"| method | initial acc | final acc | final acc, test + {s['holdout']} holdout | served at the fleet's "
        "label prior, same reviews | acc per round | total MB (down+up) | bytes vs fedavg_all | acc gain per GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, e in summ.items():
        rounds = " → ".join(f"{r['mean']:.3f}" for r in e["round_accuracy"])
        ratio = "-" if e["bytes_vs_fedavg_all"] is None else f"{e['bytes_vs_fedavg_all']:.3f}"
        held = "-" if e["holdout_accuracy"] is None else _pm(e["holdout_accuracy"])
        served = "-" if e.get("served_accuracy") is None else _pm(e["served_accuracy"])
        gain = "-" if e["gain_per_gb"] is None else _pm(e["gain_per_gb"], 1.0, 3)
        lines.append(f"| {method} | {_pm(e['initial_accuracy'])} | {_pm(e['final_accuracy'])} | {held} | {served} | "
                     f"{rounds} | {_pm(e['total_bytes'], 1e-6, 1)} | {ratio} | {gain} |")
    scaled = [(m, e["scaling"]) for m, e in summ.items() if "scaling" in e]
    if scaled:
        lines += ["", "Inference scaling (cuts of the final global model as it is, no retraining; kept share of the "
                  "forward compute / of the parameters; matched: the projections around the cut's heads and neurons "
                  "refitted, without labels, to the full model on the unlabelled pool, raffm.scaling.CutMatcher; "
                  "served: matched, with the threshold at the clients' label prior):", "",
                  "| target % compute | " + " | ".join(f"{m} kept % compute / params | {m} acc (test + holdout) | "
                                                     f"{m} matched (test + holdout) | {m} served (test + holdout)"
                                                     for m, _ in scaled) + " |",
                  "|---|" + "---|---|---|---|" * len(scaled)]
        for i, f in enumerate(s["fractions"]):
            cells = []
            for _, points in scaled:
                p = points[i]
                held = "" if p["holdout_accuracy"] is None else f" ({_pm(p['holdout_accuracy'])})"
                # (only one of each pair is scored)
                matched = p["matched_holdout_accuracy"] or p["matched_accuracy"]
                served = p.get("served_holdout_accuracy") or p.get("served_accuracy")
                cells += [f"{100 * p['flops_fraction']:.1f} / {100 * p['param_fraction']:.1f}",
                          _pm(p["accuracy"]) + held, "-" if matched is None else _pm(matched),
                          "-" if served is None else _pm(served)]
            lines.append(f"| {100 * f:.0f} | " + " | ".join(cells) + " |")
    fleet = result["fleets"][str(s["seeds"][0])]
    lines += ["", f"Fleet (seed {s['seeds'][0]}) and the slice RaFFM gives each device, with its fidelity to the full "
              "model at version 0:", "",
              "| client | tier | budget MiB | examples | spec | params % | predicted MiB | hidden cosine | agreement |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in fleet:
        if c["spec"] == "-":
            lines.append(f"| {c['client']} | {c['tier']} | {c['train_memory_mb']:.0f} | {c['examples']} | - | | | | |")
            continue
        lines.append(f"| {c['client']} | {c['tier']} | {c['train_memory_mb']:.0f} | {c['examples']} | `{c['spec'][:24]}` "
                     f"| {100 * c['param_fraction']:.0f} | {c['predicted_mb']:.0f} | {c['hidden_cosine']:.3f} | "
                     f"{c['prediction_agreement']:.3f} |")
    return "\n".join(lines)


def minilm_setup() -> tuple[Callable[[int], PreTrainedModel], TextDataset, Tokenizer]:
    from transformers import AutoTokenizer

    from raffm.data import rotten_tomatoes
    from raffm.models import load_global_model, resolve_model

    def factory(seed: int) -> PreTrainedModel:
        torch.manual_seed(seed)  # the fresh classification head
        return load_global_model()

    return factory, rotten_tomatoes(), AutoTokenizer.from_pretrained(resolve_model(None))


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke size (a few minutes)")
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--markdown", type=Path, help="write the tables to this Markdown file")
    for name in ("clients", "rounds", "local_steps", "warmup_steps", "batch_size", "seq_len", "test_size", "max_train",
                 "holdout", "distill_pool", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--fedprox-mu", type=float)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 0,1,2")
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--raffm", dest="raffm_options", metavar="JSON", type=_options,
                        help='strategy settings of the raffm method, e.g. \'{"ordering": "every_round"}\'')
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else DEFAULT
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("quick", "json", "markdown") and v is not None}
    if "methods" in overrides:
        overrides.setdefault("scaling_methods", tuple(m for m in SCALING_METHODS if m in overrides["methods"]))
    return replace(settings, **overrides), args


def _options(text: str) -> tuple[tuple[str, Any], ...]:
    values = json.loads(text)
    Strategy(**values)  # fail early, naming the bad setting
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in values.items()))


def main(argv: list[str] | None = None) -> int:
    settings, args = parse_args(argv)
    factory, data, tokenizer = minilm_setup()
    print(f"bench_fl: {settings}", flush=True)
    result = run_bench(settings, factory, data, tokenizer, log=lambda m: print(m, flush=True))
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    text = render(result)
    print()
    print(text)
    print(f"\n{result['seconds']:.0f} s on {result['machine']['cores']} cores")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
