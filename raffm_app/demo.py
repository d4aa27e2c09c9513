"""`raffm demo`: a real federated fine-tuning run on one machine, in one command.

It starts the registry, extractor and aggregator as separate processes on free loopback ports (SQLite and a checkpoint
directory under ``runs/<id>/``), then a simulated fleet of edge agents in device tiers from a Raspberry-Pi-like budget
to a full-model server, each with a non-IID share of the Rotten Tomatoes reviews (or of any data set the agent takes:
--data FILE.csv/.tsv/.json/.pt/.npz, a folder of images or mnist; images train a small ViT). The server keeps a
held-out test split. While a round runs it shows the devices done and the bytes moved; after each round, the global
test accuracy, as trained and (a classifier, when the server keeps unlabelled examples) served with its threshold at
the fleet's label prior; at the end it cuts sub-models of several sizes from the final global model (no retraining)
and scores each as cut, matched to the full model and, for a classifier, served with its threshold at the fleet's
label prior, and writes ``report.json``, ``report.md`` and plots. Everything talks over the same gRPC protocol a real
deployment uses; only the processes are local.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_agent.simulate import AGENT_GRACE_S, Tier, load_tiers, tiers_toml
from raffm.data import LABEL_COLUMN_HELP, TEXT_COLUMN_HELP
from raffm_app.cli import strategy_arg, wire_dtype_arg
from raffm_app.follow import RoundFailed, final_version, follow_job, scaling, served_accuracy
from raffm_app.processes import (
    Interrupted, ProcessFailed, ProcessGroup, SignalGuard, raffm_command, serve_on_free_ports, wait_serving,
)

# Device tiers of the default fleet: training memory (MiB) is what one training step may use on top of the runtime.
# The smallest tiers cannot hold the whole MiniLM (about 500 MiB at batch 16 x 64 tokens) and train a sub-model.
DEFAULT_TIERS = (
    Tier("sbc", memory_mb=160, gflops=8, up_mbps=10, down_mbps=40, share=2, tier="sbc"),
    Tier("phone", memory_mb=260, gflops=15, up_mbps=20, down_mbps=80, share=2, tier="phone"),
    Tier("jetson", memory_mb=380, gflops=30, up_mbps=50, down_mbps=200, share=2, tier="jetson"),
    Tier("server", memory_mb=4000, gflops=200, up_mbps=1000, down_mbps=1000, share=2, tier="server"),
)
FULL_MODEL_MEMORY_MB = 4000  # --baseline fedavg gives every tier this budget, so every device trains the whole model

# A decoder LLM (--model smollm2, the shipped SmolLM2-135M-Instruct, or any Llama-family folder) runs federated LoRA
# on prompt -> response pairs instead. Its tiers, sized with the cost model for SmolLM2 at 8 x 64 tokens and LoRA
# ranks 4/8/16 on every linear layer (predicted training memory, the fitter's choice; the tied embedding, frozen,
# stays fp32 because it is also the LM head):
#   phone   840 MiB: 2 of 3 KV groups (6 of 9 query heads, FFN 1024; 99 M parameters), checkpointing, rank 16: 772 MiB
#   laptop  960 MiB: the full model, checkpointing, rank 8 (rank 16 needs a 988 MiB budget): 885 MiB
#   server 2000 MiB: the full model, no checkpointing, rank 16: 1529 MiB
# (the full model needs a 929 MiB budget even at rank 4 with checkpointing). The budgets leave about 8% for the
# closed-loop correction: should a measured peak run above its prediction, the planner plans with a budget
# cut by that ratio (the phone keeps a slice, the laptop the full model at a lower rank).
LLM_TIERS = (
    Tier("phone", memory_mb=840, gflops=15, up_mbps=20, down_mbps=100, share=1, tier="phone"),
    Tier("laptop", memory_mb=960, gflops=40, up_mbps=50, down_mbps=200, share=1, tier="laptop"),
    Tier("server", memory_mb=2000, gflops=200, up_mbps=1000, down_mbps=1000, share=1, tier="server"),
)
LLM_LORA_RANKS = (4, 8, 16)
# What a decoder LLM's demo changes from the defaults (each still overridable by its flag): small enough for 2 cores.
LLM_DEFAULTS: dict[str, Any] = dict(devices=3, rounds=3, local_steps=8, batch_size=8, seq_len=64, lr=1e-3,
                                    test_size=200, round_deadline_s=3600.0, scaling_samples=100, match_cuts=False)


TEST_SIZE = 600  # the most examples the server holds out by default


@dataclass
class DemoSettings:
    devices: int = 8
    # 4 rounds x 15 steps: bench_fl's default size (its 4-seed figures describe this run) and 11 min on 2 cores
    # (5 x 20 took 16-17 min and swung as much from round to round: bench/results/2026-11-30-fl.md)
    rounds: int = 4
    seed: int = 0
    model: str = "minilm"
    data: str = "rotten_tomatoes"
    text_column: str = ""  # of a CSV/JSON --data; empty: found by name (raffm.data.load_text_file)
    label_column: str = ""
    out: Path | None = None
    baseline: str = "none"  # or "fedavg"
    strategy: str = "raffm"
    aggregation: str = ""  # "" = the strategy's
    strategy_options: str = ""  # JSON object of strategy settings, e.g. {"prior_correction": 0}
    local_steps: int = 15
    batch_size: int = 16
    seq_len: int = 48  # covers most review snippets (about 26 words on average)
    lr: float = 2e-4
    warmup_steps: int = 0
    alpha: float = 2.0
    test_size: int | None = None  # held-out examples; None: a fifth of the data, at most TEST_SIZE
    # Examples the server keeps, without their labels, for the strategy's distillation step (server_distill_steps),
    # taken before the fleet's share, or to match the cuts (match_cuts), drawn from it.
    distill_size: int = 1000
    # Score every cut of the final model also matched to the full model on distill_size unlabelled examples the
    # server keeps (raffm.scaling.CutMatcher), drawn from the fleet's share (split_and_write).
    match_cuts: bool = True
    max_train: int = 0  # 0 = all training examples
    wire_dtype: str = "float32"
    # A round closes as soon as every device is done; the deadline only cuts off a device that stalls. Eight devices
    # sharing two cores took 320 s over round 1 (the first downloads, the round-0 evaluation): at 300 s two of them
    # came too late and their work was lost.
    round_deadline_s: float = 600.0
    keep_running: bool = False
    tiers: list[Tier] = field(default_factory=lambda: list(DEFAULT_TIERS))
    progress_s: float = 15.0  # without a terminal, a progress line of the round in flight this often
    # Decoder LLMs: the LoRA ranks devices are fitted to ((): full-parameter slices), the chat template (for a
    # tokenizer that has one), and how many test examples each cut of the inference-scaling table is scored on.
    lora_ranks: tuple[int, ...] = LLM_LORA_RANKS
    chat_template: bool = True
    scaling_samples: int = 0  # 0: the whole test split


def is_llm(model: str) -> bool:
    """Whether ``--model`` names a decoder LLM (the ``smollm2`` alias, or a folder/id of a Llama-family model)."""
    from raffm.models import DEFAULT_MODEL, SMOLLM2

    if model == SMOLLM2:
        return True
    if model == DEFAULT_MODEL:
        return False
    from raffm.models import load_config
    from raffm.planning import default_task

    try:
        return default_task(load_config(model).model_type) == "causal-lm"
    except (OSError, ValueError):
        return False  # not loadable here: the services say why


def llm_settings(**values: Any) -> DemoSettings:
    """Settings for a decoder LLM: :data:`LLM_DEFAULTS` and :data:`LLM_TIERS`, then ``values``."""
    return DemoSettings(**{"tiers": list(LLM_TIERS), **LLM_DEFAULTS, **values})


@dataclass(frozen=True)
class DemoData:
    """The demo's data: the fleet's share and the server's held-out split, in memory and as files."""

    train: Any  # raffm.data.TextDataset | ImageDataset
    test: Any
    train_path: Path
    test_path: Path
    distill_path: Path | None = None  # the server's unlabelled data: to distil, or to match the cuts

    @property
    def image(self) -> bool:
        from raffm.data import ImageDataset

        return isinstance(self.test, ImageDataset)

    @property
    def causal(self) -> bool:
        from raffm.generative import InstructionDataset

        return isinstance(self.test, InstructionDataset)

    @property
    def task(self) -> str:
        if self.causal:
            return "causal-lm"
        return "image-classification" if self.image else "sequence-classification"

    @property
    def label_names(self) -> tuple[str, ...]:
        if self.causal:  # the distinct answers (a sentiment task's two words); informational
            return tuple(sorted(set(self.test.responses)))
        return tuple(self.test.label_names)

    @property
    def majority_rate(self) -> float:
        """The share of the most frequent label (for pairs: answer) in the test split."""
        keys = list(self.test.responses) if self.causal else list(self.test.labels)
        return max(keys.count(y) for y in set(keys)) / len(keys)


def serve_at_fleet_prior(settings: DemoSettings, data: DemoData, store: Path, version: str, test: Any,
                         prior: Any) -> tuple[list[float], float]:
    """The final classifier served with its threshold fitted, on the server's unlabelled inputs, to the fleet's label
    shares (:func:`fleet_prior`; its devices train for balanced labels); printed, and returned for the report."""
    assert data.distill_path is not None
    accuracy = served_accuracy(settings, store, version, test, data.distill_path, prior)
    shares = ", ".join(f"{name} {share:.0%}" for name, share in zip(data.label_names, prior.tolist()))
    print(f"  final model served with its threshold at the fleet's label prior ({shares}): test accuracy "
          f"{accuracy:.1%}")
    return prior.tolist(), accuracy


def prepare_data(settings: DemoSettings, data_dir: Path) -> DemoData:
    """Load ``--data`` as an agent would (``rotten_tomatoes``, ``mnist``, CSV/TSV/JSON text or ``.pt``/``.npz``
    images) and split it: the server keeps ``test_size`` examples; the rest is written for the fleet to share."""
    from edge_agent.localdata import load_local_data

    # Labels travel as numbers (the data's label ids); their names go to the job.
    data = load_local_data(settings.data, text_column=settings.text_column, label_column=settings.label_column)
    return split_and_write(settings, data, data_dir)


def split_and_write(settings: DemoSettings, data: Any, data_dir: Path) -> DemoData:
    """Hold out ``test_size`` examples (seeded; by default a fifth, at most :data:`TEST_SIZE`), then
    ``distill_size`` for the server's distillation step when the strategy distils (no device holds them), keep at
    most ``max_train`` of the rest, and write them for the agents and the aggregator to read. Matching the cuts
    trains nothing: its ``distill_size`` unlabelled inputs (a stand-in for public data of the same kind) are drawn from
    the fleet's share, so the fleet trains on the same data with or without it."""
    import random

    from edge_agent.simulate import write_share
    from raffm.scaling import MATCH_MIN_EXAMPLES

    pool = settings.distill_size if distils(settings) else 0
    held = max(1, min(TEST_SIZE, len(data) // 5)) if settings.test_size is None else settings.test_size
    if held + pool >= len(data):
        named = f"--test-size {held}" + (f" and --distill-size {pool}" if pool else "")
        raise ValueError(f"{named} leave no training data ({len(data)} examples)")
    order = list(range(len(data)))
    random.Random(settings.seed).shuffle(order)
    test, train = data.subset(order[:held]), data.subset(order[held + pool :])
    if settings.max_train:
        train = train.subset(range(min(settings.max_train, len(train))))
    data_dir.mkdir(parents=True, exist_ok=True)
    unlabelled = None
    if pool:
        unlabelled = data.subset(order[held : held + pool])
    elif settings.match_cuts and len(train) >= MATCH_MIN_EXAMPLES:
        unlabelled = train.subset(range(min(settings.distill_size, len(train))))
    distill_path = None
    if unlabelled is not None:  # no labels leave for the server (an image file holds them; the server never reads them)
        distill_path = write_share(unlabelled, data_dir / "server_unlabelled", labels=False)
    return DemoData(train, test, write_share(train, data_dir / "train"), write_share(test, data_dir / "test"),
                    distill_path)


def prepare_llm_data(settings: DemoSettings, model_path: str, data_dir: Path) -> DemoData:
    """Prompt -> response pairs for a decoder LLM (:func:`raffm.generative.load_instructions`: ``rotten_tomatoes`` as
    sentiment instructions, a CSV/JSON file of pairs, or a labelled text file asked for its labels), rendered with the
    tokenizer's chat template when it has one (an instruct model such as SmolLM2-Instruct); split like
    :func:`prepare_data` and written as JSON lines, so the agents and the aggregator read the same rendered text."""
    from transformers import AutoTokenizer

    from raffm.generative import has_chat_template, load_instructions, with_chat_template

    data = load_instructions(settings.data, text_column=settings.text_column, label_column=settings.label_column)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if settings.chat_template and has_chat_template(tokenizer):
        data = with_chat_template(data, tokenizer)
    return split_and_write(settings, data, data_dir)


def demo_model(settings: DemoSettings, data: DemoData, model_dir: Path) -> str:
    """The model the job trains: ``--model``, or for image data given no ``--model``, a small ViT for its images
    (random init, seeded; :func:`raffm.models.small_vit_config`) written to ``model_dir``."""
    from raffm.models import DEFAULT_MODEL

    if not data.image or settings.model != DEFAULT_MODEL:
        return settings.model
    import torch

    from raffm.models import model_from_config, small_vit_config

    _, channels, height, _ = data.test.images.shape
    torch.manual_seed(settings.seed)
    config = small_vit_config(num_labels=len(data.label_names), image_size=int(height), num_channels=int(channels),
                              id2label=dict(enumerate(data.label_names)))
    model_from_config(config, task="image-classification").save_pretrained(model_dir)
    return str(model_dir)


def job_strategy(settings: DemoSettings) -> str:
    """The method the job runs: ``--baseline fedavg`` is full-model FedAvg, whatever ``--strategy`` says."""
    return "fedavg" if settings.baseline == "fedavg" else settings.strategy


def effective_tiers(settings: DemoSettings) -> list[Tier]:
    """The tiers the fleet runs with: ``--baseline fedavg`` lifts every memory budget to the full model's."""
    if settings.baseline != "fedavg":
        return list(settings.tiers)
    return [replace(t, memory_mb=max(t.memory_mb, FULL_MODEL_MEMORY_MB)) for t in settings.tiers]


class DemoStopped(Exception):
    """A stop signal ended the demo; everything it started has stopped."""

    def __init__(self, signal_name: str, signum: int, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal_name}; every process it started has exited; run directory: {run_dir}")
        self.signum, self.run_dir = signum, run_dir


def run_demo(settings: DemoSettings) -> Path:
    """Run the demo end to end and return the run directory (its report is written there).

    SIGTERM, SIGINT and SIGHUP stop it: every process it started is stopped, the last started first, and
    :class:`DemoStopped` says where the run directory is. Its children also stop by themselves if it dies.
    """
    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{secrets.token_hex(2)}"
    run_dir = (settings.out or Path("runs") / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"RaFFM demo: run directory {run_dir}", flush=True)
    guard = SignalGuard()
    try:
        with guard.installed():
            _run_demo(settings, run_dir, guard)
    except Interrupted as exc:
        raise DemoStopped(exc.name, exc.signum, run_dir) from None
    return run_dir


def _run_demo(settings: DemoSettings, run_dir: Path, guard: SignalGuard) -> None:
    from raffm.report import RunReport, write_report

    llm = is_llm(settings.model)
    if llm:
        from raffm.models import SMOLLM2, resolve_model

        if settings.model == SMOLLM2 or settings.model.endswith(".gguf"):
            print(f"model {settings.model}: a GGUF file, converted once into the model cache (~30 s the first "
                  "time) ...", flush=True)
        # Every service and agent loads the same HF folder by path: no process converts it again.
        settings = replace(settings, model=resolve_model(settings.model))
        data = prepare_llm_data(settings, settings.model, run_dir / "data")
    else:
        data = prepare_data(settings, run_dir / "data")
        settings = replace(settings, model=demo_model(settings, data, run_dir / "model"))
    test = data.test
    if llm:
        print(f"data: {len(data.train)} training and {len(test)} held-out prompt -> response pairs, answers "
              f"{', '.join(repr(a) for a in data.label_names[:10])}; model {settings.model}; federated LoRA, ranks "
              f"{', '.join(map(str, job_lora_ranks(settings))) or 'none (full-parameter slices)'}")
    else:
        print(f"data: {len(data.train)} training and {len(test)} held-out examples, {len(data.label_names)} labels "
              f"({', '.join(data.label_names[:10])}{', ...' if len(data.label_names) > 10 else ''}); "
              f"model {settings.model}")
    tiers = effective_tiers(settings)
    (run_dir / "tiers.toml").write_text(tiers_toml(tiers))

    secrets_env = {
        "RAFFM_ENROLL_KEY": secrets.token_urlsafe(16),
        "RAFFM_OPERATOR_TOKEN": secrets.token_urlsafe(16),
        "RAFFM_TICKET_SECRET": secrets.token_urlsafe(32),
    }
    env = {**os.environ, **secrets_env, "RAFFM_AGENT_ENROLL_KEY": secrets_env["RAFFM_ENROLL_KEY"],
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    store = run_dir / "checkpoints"

    group = ProcessGroup(run_dir / "logs", guard)
    report = RunReport(
        run_id=run_dir.name,
        command="raffm demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else "raffm demo",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items() if k != "tiers"},
        majority_rate=data.majority_rate, metric="exact match" if data.causal else "accuracy",
    )
    report.settings["tiers"] = {t.name: {"memory_mb": t.memory_mb, "gflops": t.gflops, "up_mbps": t.up_mbps,
                                          "down_mbps": t.down_mbps, "share": t.share} for t in tiers}
    report.settings["task"], report.settings["labels"] = data.task, list(data.label_names)
    try:
        # Each service picks its own ports (see serve_on_free_ports); the registry's address is the others' flag.
        group.start("registry", raffm_command(
            "registry", "serve", "--db", f"sqlite:///{run_dir / 'registry.db'}", "--liveness-window-s", "600",
            *serve_on_free_ports(group, "registry")), env)
        registry = f"127.0.0.1:{wait_serving(group, 'registry')['grpc']}"
        group.start("extractor", raffm_command(
            "extractor", "serve", "--store", str(store), "--registry", registry,
            *serve_on_free_ports(group, "extractor")), env)
        group.start("aggregator", raffm_command(
            "aggregator", "serve", "--data-dir", str(run_dir / "aggregator"), "--store", str(store),
            "--registry", registry, *serve_on_free_ports(group, "aggregator"),
            "--model", settings.model, "--task", data.task, *job_task_args(settings, data),
            "--dataset", Path(settings.data).name,
            "--rounds", str(settings.rounds),
            "--clients-per-round", str(settings.devices), "--quorum", str(settings.devices),
            "--min-updates", "1", "--round-deadline-s", str(settings.round_deadline_s),
            "--local-steps", str(settings.local_steps), "--batch-size", str(settings.batch_size),
            "--seq-len", str(settings.seq_len), "--lr", str(settings.lr), "--warmup-steps", str(settings.warmup_steps),
            "--wire-dtype", settings.wire_dtype,
            "--strategy", job_strategy(settings), *(["--aggregation", settings.aggregation] if settings.aggregation else []),
            "--seed", str(settings.seed), "--poll-wait-s", "1",
            # The aggregator scores every new version on the held-out split (its log says how the model is doing),
            # and with the server's unlabelled examples, served at the fleet's label prior too.
            "--eval-data", str(data.test_path), "--eval-max-samples", "0",
            *(["--distill-data", str(data.distill_path)] if data.distill_path else [])), aggregator_env(env))
        ports = {name: wait_serving(group, name) for name in ("registry", "extractor", "aggregator")}
        addr = {name: f"127.0.0.1:{p['grpc']}" for name, p in ports.items()}
        metrics = {name: p["metrics"] for name, p in ports.items()}
        report.settings["metrics_ports"] = metrics
        _write_prometheus_targets(run_dir / "prometheus-targets.json", metrics)
        print("services up: " + ", ".join(f"{n} {a} (metrics :{metrics[n]})" for n, a in addr.items()))
        group.start("fleet", raffm_command(
            "agent", "simulate", "--devices", str(settings.devices), "--tiers", str(run_dir / "tiers.toml"),
            "--data", str(data.train_path), "--task", data.task, "--alpha", str(settings.alpha),
            "--seed", str(settings.seed),
            "--state-root", str(run_dir / "agents"), "--registry", addr["registry"],
            "--aggregator", addr["aggregator"], "--extractor", addr["extractor"], "--model", settings.model,
            "--max-rounds", str(settings.rounds), "--log-format", "json"), env,
            grace_s=AGENT_GRACE_S + 15.0)  # it gives its agents AGENT_GRACE_S to finish a step and report
        follow_job(settings, group, addr["aggregator"], secrets_env["RAFFM_OPERATOR_TOKEN"], store, test, report,
                   metrics)
        final = final_version(addr["aggregator"], secrets_env["RAFFM_OPERATOR_TOKEN"])
        print("inference scaling: cutting sub-models from the final global model ...")
        unlabelled = data.distill_path if settings.match_cuts else None
        if settings.match_cuts and unlabelled is None:
            print("  (too little data to keep examples for matching the cuts: each is scored as cut)")
        from raffm.threshold import fleet_prior, label_counts

        counts = label_counts(r.label_counts for r in report.rounds)  # the fleet's data, as its devices reported it
        prior = fleet_prior(counts) if unlabelled is not None and counts else None
        report.scaling = scaling(settings, store, final, test, max_samples=settings.scaling_samples,
                                 unlabelled=unlabelled, prior=prior)
        cap = settings.scaling_samples
        scored = f" (first {cap} test examples)" if 0 < cap < len(test) else ""
        for p in report.scaling:
            matched = "" if p.matched_accuracy is None else f", matched {p.matched_accuracy:.1%}"
            served = "" if p.served_accuracy is None else f", served {p.served_accuracy:.1%}"
            print(f"  cut for {p.target_fraction:4.0%}: {p.flops_fraction:6.1%} of the compute, {p.param_fraction:6.1%} "
                  f"of the parameters ({p.params:>11,}): test {report.metric} {p.accuracy:.1%}{matched}{served}"
                  f"{scored}")
        if prior is not None:
            report.label_prior, report.served_accuracy = serve_at_fleet_prior(settings, data, store, final, test,
                                                                              prior)
        for tier, m in report.memory_by_tier().items():
            print(f"  tier {tier}: slice of {m['params']:,.0f} parameters ({m['trained_params']:,.0f} trained), "
                  f"training memory predicted {m['predicted_memory_mb']:.0f} MiB, measured peak "
                  f"{m['peak_memory_mb']:.0f} MiB")
        paths = write_report(report, run_dir)
        print(f"report: {', '.join(str(p) for p in paths)}")
        if settings.keep_running:
            print("services keep running for Prometheus/Grafana (metrics ports above); Ctrl-C stops them")
            while True:
                group.check(allow_exit=("fleet",))
                time.sleep(2)
    except ProcessFailed as exc:
        print(f"raffm demo: {exc}", file=sys.stderr)
        raise
    except RoundFailed as exc:
        print(f"raffm demo: {exc}\nraffm demo: stopping; the logs are in {group.log_dir}", file=sys.stderr)
        raise
    except Interrupted:
        if sys.stderr.isatty():
            print("\nstopping services and agents ...", file=sys.stderr)
        raise
    finally:
        group.stop()


def aggregator_env(env: dict[str, str]) -> dict[str, str]:
    """The aggregator's environment: its held-out evaluation runs at round close while the agents wait, so it gets
    every core (up to 4); the agents and the other services keep one thread each."""
    return {**env, "OMP_NUM_THREADS": str(max(1, min(4, os.cpu_count() or 1)))}


def job_task_args(settings: DemoSettings, data: DemoData) -> list[str]:
    """The aggregator's task and strategy flags: labels for a classifier; the LoRA ranks for a decoder LLM; the
    ``--strategy-options`` the user gave."""
    options = strategy_options(settings)
    if data.causal and (ranks := job_lora_ranks(settings)):
        options["lora_ranks"] = ranks
    flags = ["--strategy-options", json.dumps(options)] if options else []
    if data.causal:
        return flags
    return ["--num-labels", str(len(data.label_names)), "--labels", json.dumps(list(data.label_names)), *flags]


def strategy_options(settings: DemoSettings) -> dict[str, Any]:
    """``--strategy-options`` as a dict; ``ValueError`` unless it is a JSON object."""
    try:
        options = json.loads(settings.strategy_options or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--strategy-options is not JSON ({exc}); give an object, e.g. "
                         "'{\"prior_correction\": 0}'") from None
    if not isinstance(options, dict):
        raise ValueError("--strategy-options must be a JSON object of strategy settings, e.g. "
                         "'{\"prior_correction\": 0}'")
    return options


def distils(settings: DemoSettings) -> bool:
    """Whether the job's strategy has a server distillation step (a decoder LLM's LoRA jobs never do)."""
    from raffm.strategy import strategy_named

    if is_llm(settings.model):
        return False
    return bool(strategy_named(job_strategy(settings)).with_options(**strategy_options(settings)).server_distill_steps)


def job_lora_ranks(settings: DemoSettings) -> list[int]:
    """A decoder LLM job's LoRA ranks: ``--lora-ranks``; with ``--baseline fedavg`` the top one only (every device
    trains the same full-model LoRA)."""
    if not settings.lora_ranks:
        return []
    return [max(settings.lora_ranks)] if settings.baseline == "fedavg" else list(settings.lora_ranks)


def _write_prometheus_targets(path: Path, metrics: dict[str, int]) -> None:
    """A Prometheus ``file_sd_configs`` file for this run's metrics ports (see deploy/README.md)."""
    targets = [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": f"raffm-{name}"}} for name, port in metrics.items()]
    path.write_text(json.dumps(targets, indent=2) + "\n")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run a real federated fine-tuning job on this machine (services + simulated fleet) and write a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d, llm = DemoSettings(), llm_settings()

    def both(name: str, unit: str = "") -> str:
        """``8 (smollm2: 3)``: the default, and a decoder LLM's where it differs."""
        mine, theirs = getattr(d, name), getattr(llm, name)
        return f"{mine:g}{unit}" + ("" if mine == theirs else f"; an LLM: {theirs:g}{unit}")

    parser.add_argument("--devices", type=int, default=None, help=f"simulated devices (default: {both('devices')})")
    parser.add_argument("--rounds", type=int, default=None, help=f"federated rounds (default: {both('rounds')})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data split and training (default: 0)")
    parser.add_argument("--model", default=d.model,
                        help="HF model id or folder (default: the shipped MiniLM for text, a small ViT built for the "
                             "images for image data). smollm2: the shipped SmolLM2-135M-Instruct (a decoder LLM): "
                             "federated LoRA on the Rotten Tomatoes reviews as chat-template sentiment instructions, "
                             "scored by greedy exact match and loss on the held-out split; a decoder LLM gets "
                             "the LLM defaults below and tiers sized for SmolLM2 (phone 840, laptop 960, server "
                             "2000 MiB). On 2 cores its default run takes about 30-40 min (the first use also "
                             "converts the GGUF, ~30 s)")
    parser.add_argument("--data", default=d.data,
                        help="what the agent takes: rotten_tomatoes or mnist (shipped), a CSV/TSV/JSON/Parquet file "
                             "of texts (or sentence pairs) and labels, a .pt/.npz file with images and labels, or a "
                             "folder of images in one subfolder per label; the labels and the task come from the "
                             "data; for a decoder LLM rotten_tomatoes, a CSV/JSON file of {prompt, response} pairs, "
                             "or a labelled CSV/JSON file, each text asked for its label (\"Text: ...\\nLabel:\" -> "
                             "\" <label>\") (default: rotten_tomatoes)")
    parser.add_argument("--text-column", help=TEXT_COLUMN_HELP)
    parser.add_argument("--label-column", help=LABEL_COLUMN_HELP)
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    parser.add_argument("--baseline", choices=("none", "fedavg"), default=d.baseline,
                        help="fedavg: every device trains the full model with plain FedAvg, for comparison (a "
                             "decoder LLM: every device trains the full model with the top LoRA rank)")
    parser.add_argument("--strategy", type=strategy_arg, default=d.strategy,
                        help="the federated method: raffm (default), fedavg (devices that cannot train the whole "
                             "model wait), paper (the research code's recipe), heterofl (static slices)")
    parser.add_argument("--strategy-options", default="",
                        help="JSON object of strategy settings (raffm.strategy.Strategy's fields), e.g. "
                             "'{\"prior_correction\": 0}' or '{\"server_momentum\": 0.8}'")
    parser.add_argument("--aggregation", choices=("coverage", "paper"), default=None,
                        help="override the strategy's aggregation: coverage-weighted sliced FedAvg or the paper "
                             "code's rule")
    parser.add_argument("--local-steps", type=int, default=None,
                        help=f"optimizer steps per device per round ({both('local_steps')})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"({both('batch_size')})")
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per example ({both('seq_len')})")
    parser.add_argument("--lr", type=float, default=None, help=f"local learning rate (default: {both('lr')})")
    parser.add_argument("--lora-ranks", type=_ranks, default=None, metavar="R,R,...",
                        help="a decoder LLM's LoRA ranks; each device gets the largest its budget allows "
                             f"(default: {','.join(map(str, LLM_LORA_RANKS))}; 0: full-parameter slices)")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false", default=None,
                        help="a decoder LLM: use the prompts as written, without the tokenizer's chat template")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help="local steps over which the lr rises from 0 at the start of every round (%(default)s)")
    parser.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet label skew of the split; small = non-IID")
    parser.add_argument("--test-size", type=int, default=None,
                        help=f"held-out examples the server keeps (default: a fifth of the data, at most {TEST_SIZE}; "
                             f"an LLM: {llm.test_size})")
    parser.add_argument("--scaling-samples", type=int, default=None,
                        help="test examples each cut of the inference-scaling table is scored on (default: all; "
                             f"an LLM: {llm.scaling_samples})")
    parser.add_argument("--match-cuts", action=argparse.BooleanOptionalAction, default=None,
                        help="keep --distill-size of the fleet's examples on the server without labels (standing in "
                             "for public data of the same kind) and score every cut of the final model also matched to "
                             "the full model on them: the projections around its heads and FFN neurons refitted layer "
                             "by layer by least squares (no labels read; under a minute for MiniLM's three cuts on 2 "
                             "cores), then served as the final model is, with its threshold at the fleet's label "
                             "prior. On by default for classifiers; --no-match-cuts scores the cuts as cut only")
    parser.add_argument("--distill-size", type=int, default=d.distill_size,
                        help="examples the server keeps without labels for the strategy's distillation step, when it "
                             "has one (strategy option server_distill_steps), and for matching the cuts (default: "
                             "%(default)s)")
    parser.add_argument("--max-train", type=int, default=0, help="cap on training examples shared by the fleet (0: all)")
    parser.add_argument("--wire-dtype", type=wire_dtype_arg, default=d.wire_dtype, metavar="DTYPE",
                        help="float32, float16 or bfloat16 (fp32/fp16/bf16 too); default: %(default)s")
    parser.add_argument("--round-deadline-s", type=float, default=None, help=f"({both('round_deadline_s', ' s')})")
    parser.add_argument("--tiers", type=Path, help="device tiers TOML ([tiers.NAME] memory_mb, gflops, up_mbps, "
                        "down_mbps, share); default: sbc, phone, jetson and server tiers sized for MiniLM (for an "
                        "LLM: phone, laptop and server sized for SmolLM2)")
    parser.add_argument("--keep-running", action="store_true", help="leave the services up after the report")
    parser.add_argument("--progress-s", type=float, default=d.progress_s,
                        help="without a terminal, print the round in flight's progress this often (default: "
                             "%(default)s s; a terminal gets a live bar)")
    parser.set_defaults(func=_main)


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(r) for r in text.replace(" ", "").split(",") if r)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give ranks as integers, e.g. 4,8,16") from None
    if any(r < 0 for r in ranks):
        raise argparse.ArgumentTypeError(f"{text!r}: ranks must be >= 1 (0 alone: no LoRA)")
    return tuple(r for r in ranks if r)


def _main(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items()
              if k in DemoSettings.__dataclass_fields__ and k != "tiers" and v is not None}
    settings = llm_settings(**values) if is_llm(args.model) else DemoSettings(**values)
    if args.tiers is not None:
        settings.tiers = load_tiers(args.tiers)
    if settings.devices < 1 or settings.rounds < 1:
        raise ValueError("--devices and --rounds must be at least 1")
    at_least = {"--batch-size": (settings.batch_size, 1), "--seq-len": (settings.seq_len, 1),
                "--local-steps": (settings.local_steps, 0), "--warmup-steps": (settings.warmup_steps, 0)}
    for flag, (value, least) in at_least.items():
        if value < least:
            raise ValueError(f"{flag} is {value}; it must be at least {least}")
    if not settings.lr > 0:
        raise ValueError(f"--lr is {settings.lr}; it must be > 0")
    looks_like_path = os.sep in settings.model or settings.model.startswith(".")
    if looks_like_path and not Path(settings.model).exists():
        raise ValueError(f"--model {settings.model}: no such folder or file (give a model folder, a .gguf file, an HF "
                         "id in the local cache, or smollm2; the default is the shipped MiniLM)")
    if settings.match_cuts and is_llm(settings.model):
        raise ValueError("--match-cuts scores classifiers; a decoder LLM's cuts are scored by exact match only")
    distils(settings)  # a typo in --strategy-options or a bad setting fails here, before any service starts
    try:
        run_demo(settings)
    except (ProcessFailed, RoundFailed):
        return 1
    except TimeoutError as exc:  # a service that never came up (everything started was stopped)
        print(f"raffm demo: {exc}", file=sys.stderr)
        return 1
    except DemoStopped as exc:
        print(f"raffm demo: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130
    return 0
