"""Federated job configuration: from a TOML or YAML file, overridden by CLI flags.

Example ``job.toml``::

    job_id = "minilm-rt"
    model = "minilm"          # HF id, local folder, "minilm" (all-MiniLM-L6-v2) or "smollm2" (SmolLM2-135M-Instruct)
    task = "sequence-classification"   # | image-classification | causal-lm (a decoder LLM on prompt -> response)
    num_labels = 2
    rounds = 10
    clients_per_round = 8
    quorum = 6
    round_deadline_s = 600
    wire_dtype = "float16"     # float32 | float16 | bfloat16 (fp32, fp16, bf16 are read too)
    strategy = "raffm"         # raffm | fedavg | paper | heterofl (raffm.strategy)

    [strategy_options]         # optional: override the strategy's settings
    nested_fractions = [0.25, 0.5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

# raffm.strategy and raffm.wire import torch: they are imported where a job is built, not when the command line's
# parser is (every `raffm` command, the registry's too, builds the aggregator's flags from this module).
if TYPE_CHECKING:
    from raffm.strategy import Strategy

AGGREGATIONS = ("coverage", "paper")
ON_DEADLINE = ("extend", "fail")
TASKS = ("sequence-classification", "image-classification", "causal-lm")


@dataclass(frozen=True)
class JobConfig:
    job_id: str = "job"
    model: str = "minilm"
    task: str = "sequence-classification"
    num_labels: int = 2
    # The labels' names, label id = position (from the data); empty: 0 .. num_labels - 1. On the command line a JSON
    # list or comma-separated names.
    labels: tuple[str, ...] = ()
    dataset: str = "rotten_tomatoes"
    rounds: int = 10
    clients_per_round: int = 4
    quorum: int = 3
    # A round that reaches its deadline with at least min_updates accepted closes; with fewer it is extended
    # (up to max_extensions times) or failed, as on_deadline says.
    min_updates: int = 1
    on_deadline: str = "extend"
    max_extensions: int = 3
    round_deadline_s: float = 600.0
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    fedprox_mu: float = 0.0
    wire_dtype: str = "float32"
    # The federated method (a raffm.strategy preset: raffm, fedavg, paper, heterofl) and overrides of its settings
    # (a [strategy_options] table in the job file or JSON on the command line, e.g. {"nested_fractions": [0.5]}).
    strategy: str = "raffm"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    # Shortcuts that override the strategy's own: "coverage" or "paper"; SPP "once", "every_round" or "never".
    aggregation: str = ""
    ordering: str = ""
    server_lr: float = 1.0
    accum_dtype: str = "float64"
    seed: int = 0
    # Devices that poll when there is nothing to do wait this long, +- jitter (a fraction).
    poll_wait_s: float = 5.0
    poll_jitter: float = 0.2
    # Tickets stay valid this long after the round deadline (downloads of a slow device may end late).
    ticket_grace_s: float = 60.0
    # Evaluate the global model after every round on the server's held-out split (if an evaluator is configured).
    evaluate: bool = True
    # The default evaluator's held-out data: "" (off), a CSV/JSON file of texts and labels, a .pt/.npz image
    # file, "rotten_tomatoes" (the built-in corpus's test split) or "mnist"; at most eval_max_samples examples.
    eval_data: str = ""
    # Cuts (shares of the forward compute) evaluated besides the global model, e.g. [0.25, 0.5, 1.0].
    eval_fractions: tuple[float, ...] = ()
    eval_max_samples: int = 1000
    # Unlabelled data for the strategy's server distillation step (strategy option server_distill_steps): a CSV/JSON-
    # lines file with a text column (a label column is never read), a .pt/.npz image file, or "rotten_tomatoes" /
    # "mnist" (the built-in corpus's training part, never its test split). The evaluation also scores a classifier
    # served with its threshold fitted on it to the label prior the round's devices report ("served_accuracy"), and
    # with eval_fractions each evaluated cut matched to the full model on it (raffm.scaling.CutMatcher:
    # "matched_accuracy@0.25"; the evaluation, which closes the round, then takes longer: for MiniLM on 1,000 texts and
    # 2 cores, 9-24 s a cut).
    distill_data: str = ""
    # Closed-loop sizing: plan each device with its declared profile corrected by what its recent rounds really cost
    # (raffm.calibration); off: plan with the declared profile as is. A quiet device's correction halves every
    # calibration_half_life_s.
    calibrate: bool = True
    calibration_half_life_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"job setting {name} = {getattr(self, name)!r}: {why}")

        from raffm.training import OPTIMIZERS
        from raffm.wire import wire_dtype_name

        object.__setattr__(self, "wire_dtype", wire_dtype_name(self.wire_dtype))
        fractions = self.eval_fractions
        if isinstance(fractions, str):  # from a CLI flag: "0.25,0.5,1"
            fractions = [f for f in fractions.replace(" ", "").split(",") if f]
        try:
            object.__setattr__(self, "eval_fractions", tuple(float(f) for f in fractions))
        except (TypeError, ValueError):
            raise bad("eval_fractions", "give numbers in (0, 1], e.g. [0.25, 0.5, 1.0]") from None
        if any(not 0 < f <= 1 for f in self.eval_fractions):
            raise bad("eval_fractions", "every fraction must be in (0, 1]")
        labels = self.labels
        if isinstance(labels, str):  # from a CLI flag
            text = labels.strip()
            try:
                labels = json.loads(text) if text.startswith("[") else [n for n in text.split(",") if n]
            except json.JSONDecodeError as exc:
                raise bad("labels", f"not a JSON list: {exc}") from None
        object.__setattr__(self, "labels", tuple(str(n) for n in labels))
        if self.labels and len(self.labels) != int(self.num_labels):
            raise bad("labels", f"names {len(self.labels)} labels; num_labels is {self.num_labels}")
        if len(set(self.labels)) != len(self.labels):
            raise bad("labels", "label names must be distinct")
        if self.eval_max_samples < 0:
            raise bad("eval_max_samples", "must be >= 0 (0 = the whole split)")
        if not self.job_id or len(self.job_id) > 64 or not self.job_id.replace("-", "").replace("_", "").isalnum():
            raise bad("job_id", "use 1-64 letters, digits, '-' or '_'")
        if self.task not in TASKS:
            raise bad("task", f"choose one of {', '.join(TASKS)}")
        if self.task == "causal-lm" and self.labels:
            raise bad("labels", "a causal-lm job predicts tokens; it has no label names")
        if isinstance(self.strategy_options, str):  # from a CLI flag: JSON
            try:
                object.__setattr__(self, "strategy_options", json.loads(self.strategy_options or "{}"))
            except json.JSONDecodeError as exc:
                raise bad("strategy_options", f"not JSON: {exc}") from None
        if not isinstance(self.strategy_options, dict):
            raise bad("strategy_options", "give a table of strategy settings, e.g. {\"nested_fractions\": [0.5]}")
        if self.aggregation not in ("", *AGGREGATIONS):
            raise bad("aggregation", f"choose one of {', '.join(AGGREGATIONS)}")
        try:
            method = self.method()
        except (TypeError, ValueError) as exc:
            raise bad("strategy", str(exc)) from None
        if method.server_distill_steps and not self.distill_data:
            raise bad("distill_data", "the strategy's server_distill_steps needs unlabelled server data: a text file, "
                      "an image file or a built-in corpus")
        if method.server_distill_steps and self.task == "causal-lm":
            raise bad("strategy", "server_distill_steps distils a classifier's cuts; a causal-lm job has none")
        if self.on_deadline not in ON_DEADLINE:
            raise bad("on_deadline", f"choose one of {', '.join(ON_DEADLINE)}")
        if self.accum_dtype not in ("float32", "float64"):
            raise bad("accum_dtype", "choose float32 or float64")
        for name in ("rounds", "clients_per_round", "quorum", "num_labels", "batch_size", "seq_len", "local_epochs"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        for name in ("local_steps", "warmup_steps", "max_extensions", "seed", "weight_decay", "fedprox_mu",
                     "ticket_grace_s"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"choose one of {', '.join(OPTIMIZERS)}")
        if not self.poll_wait_s > 0:
            raise bad("poll_wait_s", "must be > 0 seconds")
        if self.quorum > self.clients_per_round:
            raise bad("quorum", f"cannot exceed clients_per_round ({self.clients_per_round})")
        if not 1 <= self.min_updates <= self.quorum:
            raise bad("min_updates", f"must be between 1 and quorum ({self.quorum})")
        if not self.round_deadline_s > 0 or not self.server_lr > 0 or not self.lr > 0:
            raise ValueError("round_deadline_s, server_lr and lr must be > 0")
        if not 0 <= self.poll_jitter < 1:
            raise bad("poll_jitter", "must be in [0, 1)")
        if not self.calibration_half_life_s > 0:
            raise bad("calibration_half_life_s", "must be > 0 seconds")

    def method(self) -> Strategy:
        """The job's :class:`~raffm.strategy.Strategy`: the preset, its options, then the shortcuts."""
        from raffm.strategy import strategy_named

        options = dict(self.strategy_options)
        if self.aggregation:
            options["aggregation"] = self.aggregation
        if self.ordering:
            options["ordering"] = self.ordering
        options["server_lr"] = self.server_lr
        return strategy_named(self.strategy).with_options(**options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (tuples become lists, so a stored copy compares equal after a round trip)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown job setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def load_job_file(path: str | Path) -> dict[str, Any]:
    """The settings in a ``.toml``, ``.yaml`` or ``.yml`` file (a top-level ``[job]`` table is unwrapped)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".toml":
        data = tomllib.loads(text)
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"job file {p} must end in .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"job file {p} must hold a table of settings")
    return dict(data.get("job", data))


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """``--job FILE`` plus one ``--<setting>`` flag per JobConfig field (flags override the file)."""
    group = parser.add_argument_group("job (flags override --job)")
    group.add_argument("--job", help="job settings file (.toml/.yaml)")
    for f in fields(JobConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f"job_{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            group.add_argument(flag, dest=f"job_{f.name}", type=kind, default=None, metavar=f.name.upper())


def job_from_args(args: argparse.Namespace) -> JobConfig:
    data = load_job_file(args.job) if getattr(args, "job", None) else {}
    for f in fields(JobConfig):
        value = getattr(args, f"job_{f.name}", None)
        if value is not None:
            data[f.name] = value
    return JobConfig.from_dict(data)
