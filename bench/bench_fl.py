"""Accuracy per byte: RaFFM against full-model FedAvg, capable-only FedAvg, the paper's rule and HeteroFL-style slices.

Every method sees the same fleet (memory tiers -> specs from ``raffm.fitting.fit``), the same Dirichlet split of the
Rotten Tomatoes reviews, the same initial model (MiniLM with a seeded 2-label head), the same local hyper-parameters
and the same rounds; only the method differs:

  raffm            heterogeneous budgets, salience ordering (SPP) on every new version, coverage-weighted aggregation
  fedavg_all       every client trains the whole model (the upper baseline: assumes every device can afford it)
  fedavg_capable   full-model FedAvg with only the clients whose budget fits the whole model (what users do today)
  raffm_paper      RaFFM with the official code's ``paper`` aggregation (zero-fill, divide by participants)
  heterofl         the same spec sizes as static leading slices of a model that is never salience-ordered

The run is **in-process with the core library** (extract, train_local, SlicedFedAvg): it measures the method, not the
transport (``bench_transfer.py`` and ``bench_flower.py`` measure that). Bytes are the tensor payload each round moves,
down (the slice) plus up (its delta), at the wire dtype (fp32 by default); protobuf framing adds about 0.1%
(see ``bench_transfer.py``). After the last round, sub-models cut at 25/50/75/100% of the parameters from the RaFFM
global model and from the full-FedAvg global model are evaluated (SPP is applied to both before cutting).

    .venv/bin/python bench/bench_fl.py                  # default size: under an hour on 2 cores
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
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from raffm.aggregation import SlicedFedAvg  # noqa: E402
from raffm.arch import adapter_for  # noqa: E402
from raffm.costs import OVERHEAD_MB, CostModel, dtype_bytes  # noqa: E402
from raffm.data import TextDataset, dirichlet_split  # noqa: E402
from raffm.elastic import extract, plan_for  # noqa: E402
from raffm.fitting import DEFAULT_HEADROOM, RoundBudget, fit  # noqa: E402
from raffm.report import machine_info  # noqa: E402
from raffm.scaling import DEFAULT_FRACTIONS, scaling_table  # noqa: E402
from raffm.spec import ElasticSpec  # noqa: E402
from raffm.spp import prioritize, prioritize_state  # noqa: E402
from raffm.training import LocalConfig, Tokenizer, evaluate, train_local  # noqa: E402

METHODS = ("raffm", "fedavg_all", "fedavg_capable", "raffm_paper", "heterofl")
SCALING_METHODS = ("raffm", "fedavg_all")

# Device tiers: training memory as a multiple of the *full model's* predicted training memory above the fixed
# overhead, so the same fleet shape applies to any model (for MiniLM at 16 x 64 tokens: about 170, 275, 400 MiB and
# ample, close to the tiers of `raffm demo`). Only the last tier can train the whole model.
TIERS: dict[str, float] = {"sbc": 0.32, "phone": 0.52, "jetson": 0.76, "server": 8.0}


@dataclass(frozen=True)
class Settings:
    clients: int = 8
    rounds: int = 4
    seeds: tuple[int, ...] = (0, 1)
    local_steps: int = 15
    batch_size: int = 16
    seq_len: int = 48
    lr: float = 2e-4
    alpha: float = 2.0  # Dirichlet concentration of the label split (raffm demo's default)
    test_size: int = 400
    max_train: int = 4000  # examples shared by the fleet (0: all the rest)
    wire_dtype: str = "fp32"
    methods: tuple[str, ...] = METHODS
    scaling_methods: tuple[str, ...] = SCALING_METHODS
    fractions: tuple[float, ...] = tuple(DEFAULT_FRACTIONS)
    threads: int = 0  # torch intra-op threads (0: torch's default)

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
        if not set(self.scaling_methods) <= set(self.methods):
            raise ValueError("every scaling method must also be run: add it to --methods")
        if self.clients < 1 or self.rounds < 1 or not self.seeds:
            raise ValueError("clients, rounds and seeds must be at least 1")


DEFAULT = Settings()
QUICK = Settings(clients=4, rounds=2, seeds=(0,), local_steps=2, lr=1e-4, seq_len=32, test_size=160, max_train=800,
                 fractions=(0.25, 1.0))


@dataclass
class Client:
    index: int
    tier: str
    train_memory_mb: float
    spec: ElasticSpec
    full: bool  # the budget fits the whole model
    data: TextDataset


@dataclass
class MethodRun:
    method: str
    seed: int
    initial_accuracy: float
    accuracy: list[float] = field(default_factory=list)  # after every round
    bytes_down: list[int] = field(default_factory=list)  # per round
    bytes_up: list[int] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    train_seconds: float = 0.0
    scaling: list[dict[str, Any]] = field(default_factory=list)

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
    return (OVERHEAD_MB + fraction * (full_mb - OVERHEAD_MB)) / (1 - DEFAULT_HEADROOM)


def build_fleet(model: PreTrainedModel, train: TextDataset, settings: Settings, seed: int) -> list[Client]:
    """Specs from the core fitter for every tier's budget; a Dirichlet(alpha) split of ``train``."""
    cm = CostModel.from_model(model)
    full_spec = ElasticSpec.full(cm.dims)
    full_mb = cm.estimate(full_spec, batch_size=settings.batch_size, seq_len=settings.seq_len).train_memory_mb
    parts = dirichlet_split(train.labels, settings.clients, settings.alpha, seed)
    fleet = []
    for i, part in enumerate(parts):
        tier = tier_of(i, settings.clients)
        budget = tier_budget_mb(TIERS[tier], full_mb)
        profile = RoundBudget(train_memory_mb=budget, gflops=1e4, up_mbps=1e5, down_mbps=1e5, deadline_s=1e5,
                              batch_size=settings.batch_size, seq_len=settings.seq_len,
                              local_steps=settings.local_steps)
        spec = fit(cm, profile, wire_dtype=settings.wire_dtype).spec
        fleet.append(Client(i, tier, budget, spec, spec == full_spec, train.subset(part)))
    return fleet


def payload_bytes(plan: dict[str, Any], state: dict[str, torch.Tensor], wire_dtype: str) -> int:
    """Tensor bytes of one slice (or its delta) at the wire dtype: floating-point tensors only."""
    size = dtype_bytes(wire_dtype)
    return sum(s.numel * size for name, s in plan.items() if state[name].is_floating_point())


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
) -> tuple[MethodRun, PreTrainedModel]:
    """``settings.rounds`` rounds of ``method`` from ``initial`` (not modified); returns the run and the final model."""
    model = copy.deepcopy(initial).eval()
    cm = CostModel.from_model(model)
    full = ElasticSpec.full(cm.dims)
    reorder = method in ("raffm", "raffm_paper")
    mode = "paper" if method == "raffm_paper" else "coverage"

    def ordered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A new model version: RaFFM re-applies SPP (as the aggregator does with reorder_each_round).
        return prioritize_state(state, cm.adapter, cm.dims, rank_hidden=True) if reorder else state

    model.load_state_dict(ordered({k: v.clone() for k, v in model.state_dict().items()}))
    if method == "fedavg_all":
        members = [(c, full) for c in fleet]
    elif method == "fedavg_capable":
        members = [(c, full) for c in fleet if c.full]
    else:
        members = [(c, c.spec) for c in fleet]
    run = MethodRun(method, seed, initial_accuracy=evaluate(model, test, tokenizer, seq_len=settings.seq_len))
    for rnd in range(settings.rounds):
        started = time.perf_counter()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        agg = SlicedFedAvg(state, mode=mode)  # type: ignore[arg-type]
        down = up = 0
        for client, spec in members:
            plan = plan_for(model, spec)
            sub = extract(model, spec)
            config = LocalConfig(batch_size=settings.batch_size, seq_len=settings.seq_len, lr=settings.lr,
                                 local_steps=settings.local_steps, weight_decay=0.0,
                                 seed=seed * 100_003 + rnd * 1009 + client.index)
            result = train_local(sub, client.data, tokenizer, config)
            agg.fold(result.delta, plan, result.samples)
            nbytes = payload_bytes(plan, state, settings.wire_dtype)
            down += nbytes
            up += nbytes
            del sub, result
        model.load_state_dict(ordered(agg.result()))
        run.train_seconds += time.perf_counter() - started
        run.accuracy.append(evaluate(model, test, tokenizer, seq_len=settings.seq_len))
        run.bytes_down.append(down)
        run.bytes_up.append(up)
        run.participants.append(len(members))
        log(f"  seed {seed} {method:<15} round {rnd + 1}/{settings.rounds}: accuracy {run.accuracy[-1]:.4f}, "
            f"{(down + up) / 1e6:.1f} MB, {len(members)} clients, {time.perf_counter() - started:.0f} s")
    return run, model


def summarize(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


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
        rest = order[settings.test_size :]
        train = data.subset(rest[: settings.max_train] if settings.max_train else rest)
        initial = model_factory(seed)
        fleet = build_fleet(initial, train, settings, seed)
        fleets[seed] = [
            {"client": c.index, "tier": c.tier, "train_memory_mb": round(c.train_memory_mb, 1), "spec": c.spec.key(),
             "full_model": c.full, "examples": len(c.data),
             "params": CostModel.from_model(initial).params(c.spec)}
            for c in fleet
        ]
        log(f"seed {seed}: {len(fleet)} clients, " + ", ".join(
            f"{c.tier}:{c.train_memory_mb:.0f}MiB:{len(c.data)}ex" for c in fleet))
        for method in settings.methods:
            if method == "fedavg_capable" and not any(c.full for c in fleet):
                raise ValueError("no client can afford the whole model: fedavg_capable has no participants")
            run, final = run_method(method, initial, fleet, test, tokenizer, settings, seed, log=log)
            if method in settings.scaling_methods:
                # SPP before cutting, for every method alike (RaFFM's versions are already ordered; FedAvg's are not).
                cut_from = cast(PreTrainedModel, prioritize(final))
                run.scaling = [asdict(p) for p in
                               scaling_table(cut_from, test, tokenizer, fractions=settings.fractions,
                                             seq_len=settings.seq_len)]
                log(f"  seed {seed} {method:<15} scaling: " + ", ".join(
                    f"{p['param_fraction']:.2f}->{p['accuracy']:.4f}" for p in run.scaling))
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
        "runs": [{**asdict(r), "total_bytes": r.total_bytes} for r in runs],
        "summary": summary(runs, settings),
    }


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
            "gain_per_gb": summarize([(r.accuracy[-1] - r.initial_accuracy) / (r.total_bytes / 1e9) for r in mine]),
        }
        if method in settings.scaling_methods:
            entry["scaling"] = [
                {"target_fraction": f,
                 "param_fraction": statistics.fmean(p["param_fraction"] for r in mine for p in r.scaling
                                                    if p["target_fraction"] == f),
                 "accuracy": summarize([p["accuracy"] for r in mine for p in r.scaling if p["target_fraction"] == f])}
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
    lines = [
        f"In-process (core library, no gRPC): {s['clients']} clients, {s['rounds']} rounds x {s['local_steps']} local "
        f"steps of {s['batch_size']} x {s['seq_len']} tokens, lr {s['lr']}, Dirichlet alpha {s['alpha']}, "
        f"seeds {list(s['seeds'])} (mean ± sample std), test {s['test_size']} examples, wire {s['wire_dtype']}.",
        "",
        "| method | initial acc | final acc | acc per round | total MB (down+up) | bytes vs fedavg_all | acc gain per GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, e in summ.items():
        rounds = " → ".join(f"{r['mean']:.3f}" for r in e["round_accuracy"])
        ratio = "-" if e["bytes_vs_fedavg_all"] is None else f"{e['bytes_vs_fedavg_all']:.3f}"
        lines.append(f"| {method} | {_pm(e['initial_accuracy'])} | {_pm(e['final_accuracy'])} | {rounds} | "
                     f"{_pm(e['total_bytes'], 1e-6, 1)} | {ratio} | {_pm(e['gain_per_gb'], 1.0, 3)} |")
    scaled = [(m, e["scaling"]) for m, e in summ.items() if "scaling" in e]
    if scaled:
        lines += ["", "Inference scaling (sub-models cut from the final global model after SPP, no retraining):", "",
                  "| target % params | " + " | ".join(f"{m} (kept %) | {m} acc" for m, _ in scaled) + " |",
                  "|---|" + "---|---|" * len(scaled)]
        for i, f in enumerate(s["fractions"]):
            cells = []
            for _, points in scaled:
                p = points[i]
                cells += [f"{100 * p['param_fraction']:.1f}", _pm(p["accuracy"])]
            lines.append(f"| {100 * f:.0f} | " + " | ".join(cells) + " |")
    fleet = result["fleets"][str(s["seeds"][0])]
    lines += ["", f"Fleet (seed {s['seeds'][0]}): " + "; ".join(
        f"{c['tier']} {c['train_memory_mb']:.0f} MiB → {100 * c['params'] / max(f['params'] for f in fleet):.0f}% "
        f"params, {c['examples']} ex" for c in fleet) + "."]
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
    for name in ("clients", "rounds", "local_steps", "batch_size", "seq_len", "test_size", "max_train", "threads"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 0,1,2")
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), help=f"subset of {','.join(METHODS)}")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else DEFAULT
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("quick", "json", "markdown") and v is not None}
    if "methods" in overrides:
        overrides.setdefault("scaling_methods", tuple(m for m in SCALING_METHODS if m in overrides["methods"]))
    return replace(settings, **overrides), args


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
