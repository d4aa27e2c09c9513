"""The run report: every figure of a federated run as JSON, Markdown and plots.

Nothing here is typed by hand: the orchestrator fills a :class:`RunReport` from what the services and the evaluation
measured, and :func:`write_report` renders it.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RoundRecord:
    index: int
    accuracy: float | None  # global model on the server's held-out split
    participants: int  # accepted updates
    assigned: int
    dropouts: int
    bytes_down: int
    bytes_up: int
    full_fedavg_bytes: int  # what a full-model FedAvg round with the same participants would move (down + up)
    duration_s: float
    mean_train_loss: float | None = None
    bytes_by_tier: dict[str, dict[str, int]] = field(default_factory=dict)  # tier -> {"down": n, "up": n}
    eval_loss: float | None = None  # causal-LM jobs: mean response-token loss on the held-out split (nats)
    balanced_accuracy: float | None = None  # classification: mean recall of the labels (raffm.training.Scores)
    # Per device tier: devices, params, trained_params, predicted_memory_mb, peak_memory_mb (raffm.v1.TierCosts)
    tiers: dict[str, dict[str, float]] = field(default_factory=dict)
    # The accepted devices' data, examples per label id, as they reported it (raffm.v1.Round.label_counts)
    label_counts: list[int] = field(default_factory=list)
    # The version served with its threshold at the label prior the round's devices reported (the aggregator's
    # evaluation, served_accuracy; classifiers with the server's unlabelled data)
    served_accuracy: float | None = None


@dataclass
class ScalingPoint:
    target_fraction: float  # requested share of the global model's forward compute
    param_fraction: float  # share of the parameters the chosen cut keeps
    params: int
    accuracy: float
    spec: str  # ElasticSpec.key()
    flops_fraction: float = 1.0  # share of the forward compute the chosen cut keeps
    matched_accuracy: float | None = None  # the cut matched to the full model (raffm.scaling.CutMatcher)
    served_accuracy: float | None = None  # matched, and served with its threshold at the fleet's label prior


@dataclass
class RunReport:
    run_id: str
    command: str
    date: str
    settings: dict[str, Any]
    majority_rate: float  # accuracy of always predicting the most frequent test label
    initial_accuracy: float | None = None
    # What "accuracy" measures: "accuracy" (classification) or "exact match" (causal LM: greedy answer = reference)
    metric: str = "accuracy"
    initial_loss: float | None = None  # causal LM: held-out response-token loss of the initial model
    rounds: list[RoundRecord] = field(default_factory=list)
    scaling: list[ScalingPoint] = field(default_factory=list)
    # The final model served with its threshold fitted to the fleet's label prior (raffm.threshold): the prior, its
    # accuracy on the test split
    label_prior: list[float] | None = None
    served_accuracy: float | None = None
    machine: dict[str, Any] = field(default_factory=lambda: machine_info())

    @property
    def final_accuracy(self) -> float | None:
        scored = [r.accuracy for r in self.rounds if r.accuracy is not None]
        return scored[-1] if scored else None

    def totals(self) -> dict[str, int]:
        down = sum(r.bytes_down for r in self.rounds)
        up = sum(r.bytes_up for r in self.rounds)
        full = sum(r.full_fedavg_bytes for r in self.rounds)
        return {"bytes_down": down, "bytes_up": up, "bytes_moved": down + up, "full_fedavg_bytes": full,
                "bytes_saved": full - (down + up)}

    def memory_by_tier(self) -> dict[str, dict[str, float]]:
        """Per device tier: its round with the largest measured peak training memory (MiB), with what that round
        planned (slice, trained parameters, predicted memory), so the prediction and the measurement belong together
        when the planner gave the tier different sub-models in different rounds."""
        out: dict[str, dict[str, float]] = {}
        for r in self.rounds:
            for tier, t in r.tiers.items():
                if tier not in out or t.get("peak_memory_mb", 0) > out[tier].get("peak_memory_mb", 0):
                    out[tier] = {**t, "round": r.index}
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["final_accuracy"] = self.final_accuracy
        data["totals"] = self.totals()
        data["memory_by_tier"] = self.memory_by_tier()
        return data


def machine_info() -> dict[str, Any]:
    memory_gib = None
    try:
        with open("/proc/meminfo") as f:
            memory_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cores": os.cpu_count(), "memory_gib": memory_gib, "platform": platform.platform(),
            "python": platform.python_version()}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def render_markdown(report: RunReport) -> str:
    s = report.settings
    t = report.totals()
    metric = report.metric
    held_out_loss = report.initial_loss is not None or any(r.eval_loss is not None for r in report.rounds)
    baseline = "majority-class rate" if metric == "accuracy" else "most frequent answer's rate"
    lines = [
        f"# RaFFM run {report.run_id}",
        "",
        f"- command: `{report.command}`",
        f"- date: {report.date}; machine: {report.machine['cores']} cores, {report.machine['memory_gib']} GiB",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in s.items() if not isinstance(v, dict)),
        f"- {baseline} on the test split: {_pct(report.majority_rate)}; "
        f"initial global {metric}: {_pct(report.initial_accuracy)}; final: {_pct(report.final_accuracy)}"
        + ("" if report.served_accuracy is None else
           f" ({_pct(report.served_accuracy)} served with its threshold at the fleet's label prior)"),
        f"- bytes moved: {_mib(t['bytes_moved'])} MiB (down {_mib(t['bytes_down'])}, up {_mib(t['bytes_up'])}); "
        f"full-model FedAvg with the same participants: {_mib(t['full_fedavg_bytes'])} MiB "
        f"(saved {_mib(t['bytes_saved'])} MiB)",
    ]
    if held_out_loss:
        lines.append(f"- held-out response-token loss (nats): initial {_num(report.initial_loss)}, final "
                     f"{_num(next((r.eval_loss for r in reversed(report.rounds) if r.eval_loss is not None), None))}")
    served = any(r.served_accuracy is not None for r in report.rounds)
    lines += [
        "",
        "## Rounds",
        "",
        f"| round | test {metric} |" + (" held-out loss |" if held_out_loss else "") + (" served |" if served else "")
        + " participants | dropouts | MiB down | MiB up | MiB full FedAvg | seconds | train loss |",
        "|---:|---:|" + ("---:|" if held_out_loss else "") + ("---:|" if served else "")
        + "---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.rounds:
        loss = "n/a" if r.mean_train_loss is None else f"{r.mean_train_loss:.3f}"
        lines.append(
            f"| {r.index} | {_pct(r.accuracy)} |" + (f" {_num(r.eval_loss)} |" if held_out_loss else "")
            + (f" {_pct(r.served_accuracy)} |" if served else "")
            + f" {r.participants}/{r.assigned} | {r.dropouts} | {_mib(r.bytes_down)} | {_mib(r.bytes_up)} "
            f"| {_mib(r.full_fedavg_bytes)} | {r.duration_s:.1f} | {loss} |"
        )
    memory = report.memory_by_tier()
    if memory:
        lines += ["", "## Training memory by device tier (the round with the largest measured peak)", "",
                  "| tier | round | devices | slice parameters | trained parameters | predicted MiB | measured peak MiB "
                  "| measured / predicted |", "|:--|---:|---:|---:|---:|---:|---:|---:|"]
        for tier, m in memory.items():
            ratio = m["peak_memory_mb"] / m["predicted_memory_mb"] if m.get("predicted_memory_mb") else float("nan")
            lines.append(f"| {tier} | {int(m['round'])} | {int(m.get('devices', 0))} | {int(m.get('params', 0)):,} | "
                         f"{int(m.get('trained_params', 0)):,} | {m.get('predicted_memory_mb', 0):,.0f} | "
                         f"{m['peak_memory_mb']:,.0f} | {ratio:.2f} |")
    tiers = s.get("tiers")
    if isinstance(tiers, dict) and tiers:
        fields = sorted({k for values in tiers.values() for k in values})
        lines += ["", "## Device tiers", "", "| tier | " + " | ".join(fields) + " |",
                  "|:--|" + "---:|" * len(fields)]
        lines += [f"| {name} | " + " | ".join(f"{values.get(k, '')}" for k in fields) + " |"
                  for name, values in tiers.items()]
    if report.scaling:
        matched = any(p.matched_accuracy is not None for p in report.scaling)
        served = any(p.served_accuracy is not None for p in report.scaling)
        lines += [
            "",
            "## Inference scaling (sub-models cut from the final global model, no retraining)",
            "",
            f"| target share of compute | kept compute | kept parameters | share of parameters | test {metric} |"
            + (" matched |" if matched else "") + (" served at the fleet's label prior |" if served else "")
            + " spec |",
            "|---:|---:|---:|---:|---:|" + ("---:|" if matched else "") + ("---:|" if served else "") + ":--|",
        ]
        for p in report.scaling:
            lines.append(
                f"| {p.target_fraction:.0%} | {p.flops_fraction:.1%} | {p.params:,} | {p.param_fraction:.1%} | "
                f"{_pct(p.accuracy)} |" + (f" {_pct(p.matched_accuracy)} |" if matched else "")
                + (f" {_pct(p.served_accuracy)} |" if served else "") + f" `{p.spec}` |"
            )
    lines += ["", "Plots: `accuracy.png`, `bytes.png`, `scaling.png`.", ""]
    return "\n".join(lines)


def write_plots(report: RunReport, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    rounds = [r.index for r in report.rounds]
    majority = "majority class" if report.metric == "accuracy" else "most frequent answer"

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [0] + rounds if report.initial_accuracy is not None else rounds
    ys = ([report.initial_accuracy] if report.initial_accuracy is not None else []) + [
        r.accuracy if r.accuracy is not None else float("nan") for r in report.rounds
    ]
    ax.plot(xs, [100 * y for y in ys], marker="o", label="global model")
    if any(r.served_accuracy is not None for r in report.rounds):
        served = [float("nan") if r.served_accuracy is None else 100 * r.served_accuracy for r in report.rounds]
        ax.plot(rounds, served, marker="^", label="served at the fleet's label prior")
    ax.axhline(100 * report.majority_rate, color="grey", linestyle="--", label=majority)
    ax.set(xlabel="round", ylabel=f"test {report.metric} (%)", title=f"Global test {report.metric} per round",
           xticks=xs)
    ax.legend()
    written.append(_save(fig, out / "accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    tiers = sorted({t for r in report.rounds for t in r.bytes_by_tier})
    bottom = [0.0] * len(rounds)
    for tier in tiers:
        heights = [(r.bytes_by_tier.get(tier, {}).get("down", 0) + r.bytes_by_tier.get(tier, {}).get("up", 0)) / 2**20
                   for r in report.rounds]
        ax.bar(rounds, heights, bottom=bottom, label=tier)
        bottom = [b + h for b, h in zip(bottom, heights)]
    if not tiers:
        ax.bar(rounds, [(r.bytes_down + r.bytes_up) / 2**20 for r in report.rounds], label="RaFFM")
    ax.plot(rounds, [r.full_fedavg_bytes / 2**20 for r in report.rounds], "k--o", label="full-model FedAvg")
    ax.set(xlabel="round", ylabel="MiB moved (down + up)", title="Communication per round and device tier",
           xticks=rounds)
    ax.set_ylim(0, 1.25 * max([r.full_fedavg_bytes / 2**20 for r in report.rounds] + bottom + [1.0]))
    ax.legend(fontsize="small", loc="upper left", ncol=3)
    written.append(_save(fig, out / "bytes.png"))

    if report.scaling:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([100 * p.flops_fraction for p in report.scaling], [100 * p.accuracy for p in report.scaling],
                marker="o", label="cut of the final global model")
        for key, marker, label in (("matched_accuracy", "s", "matched to the full model"),
                                   ("served_accuracy", "^", "matched, served at the fleet's label prior")):
            if any(getattr(p, key) is not None for p in report.scaling):
                ax.plot([100 * p.flops_fraction for p in report.scaling],
                        [100 * (getattr(p, key) or 0) for p in report.scaling], marker=marker, label=label)
        ax.axhline(100 * report.majority_rate, color="grey", linestyle="--", label=majority)
        ax.set(xlabel="forward compute kept (%)", ylabel=f"test {report.metric} (%)",
               title="Inference scaling without retraining")
        ax.legend()
        written.append(_save(fig, out / "scaling.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(report: RunReport, out: Path) -> list[Path]:
    """Write report.json, report.md and the plots into ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    return [out / "report.json", out / "report.md", *write_plots(report, out)]
