"""`raffm demo`: a real federated fine-tuning run on one machine, in one command.

It starts the registry, extractor and aggregator as separate processes on free loopback ports (SQLite and a
checkpoint directory under ``runs/<id>/``), then a simulated fleet of edge agents in device tiers from a
Raspberry-Pi-like budget to a full-model server, each with a non-IID share of the Rotten Tomatoes reviews. The server
keeps a held-out test split. Every round it prints the global test accuracy and the bytes moved; at the end it cuts
sub-models of several sizes from the final global model (no retraining) and writes ``report.json``, ``report.md`` and
plots. Everything talks over the same gRPC protocol a real deployment uses; only the processes are local.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

# Device tiers of the default fleet: training memory (MiB) is what one training step may use on top of the runtime.
# The smallest tiers cannot hold the whole MiniLM (about 500 MiB at batch 16 x 64 tokens) and train a sub-model.
DEFAULT_TIERS: dict[str, dict[str, float]] = {
    "sbc": {"memory_mb": 160, "gflops": 8, "up_mbps": 10, "down_mbps": 40, "share": 2},
    "phone": {"memory_mb": 260, "gflops": 15, "up_mbps": 20, "down_mbps": 80, "share": 2},
    "jetson": {"memory_mb": 380, "gflops": 30, "up_mbps": 50, "down_mbps": 200, "share": 2},
    "server": {"memory_mb": 4000, "gflops": 200, "up_mbps": 1000, "down_mbps": 1000, "share": 2},
}
FULL_MODEL_MEMORY_MB = 4000  # --baseline fedavg gives every tier this budget, so every device trains the whole model


@dataclass
class DemoSettings:
    devices: int = 8
    rounds: int = 5
    seed: int = 0
    model: str = "minilm"
    data: str = "rotten_tomatoes"
    out: Path | None = None
    baseline: str = "none"  # or "fedavg"
    aggregation: str = "coverage"
    local_steps: int = 20
    batch_size: int = 16
    seq_len: int = 48  # covers most review snippets (about 26 words on average)
    lr: float = 2e-4
    alpha: float = 2.0
    test_size: int = 600
    max_train: int = 0  # 0 = all training examples
    wire_dtype: str = "float32"
    round_deadline_s: float = 300.0
    keep_running: bool = False
    tiers: dict[str, dict[str, float]] = field(default_factory=lambda: {k: dict(v) for k, v in DEFAULT_TIERS.items()})


class ProcessFailed(RuntimeError):
    def __init__(self, name: str, code: int | None, log: Path) -> None:
        super().__init__(f"{name} exited with code {code}; its log is {log}")
        self.name, self.code, self.log = name, code, log


class ProcessGroup:
    """Child processes with their logs; stopped together (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path, TextIO]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.log_dir / f"{name}.log"
        handle = log.open("w")
        handle.write("$ " + shlex.join(argv) + "\n")
        handle.flush()
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name] = (proc, log, handle)

    def check(self, *, allow_exit: Sequence[str] = ()) -> None:
        """Raise :class:`ProcessFailed` for the first process that died (a clean exit is fine for ``allow_exit``)."""
        for name, (proc, log, _) in self.procs.items():
            code = proc.poll()
            if code is not None and not (code == 0 and name in allow_exit):
                raise ProcessFailed(name, code, log)

    def stop(self, grace_s: float = 15.0) -> None:
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc, _, handle in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            handle.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raffm(*args: str) -> list[str]:
    return [sys.executable, "-m", "raffm.cli", *args]


def prepare_data(settings: DemoSettings, data_dir: Path) -> tuple[Path, Any]:
    """Split the data: the server keeps ``test_size`` examples; the rest is written for the fleet to share."""
    from raffm.data import load_text_file, rotten_tomatoes

    data = rotten_tomatoes() if settings.data == "rotten_tomatoes" else load_text_file(settings.data)
    if settings.test_size >= len(data):
        raise ValueError(f"--test-size {settings.test_size} leaves no training data ({len(data)} examples)")
    import random

    order = list(range(len(data)))
    random.Random(settings.seed).shuffle(order)
    test, train = data.subset(order[: settings.test_size]), data.subset(order[settings.test_size :])
    if settings.max_train:
        train = train.subset(range(min(settings.max_train, len(train))))
    data_dir.mkdir(parents=True, exist_ok=True)
    train_path = data_dir / "train.csv"
    with train_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(train.texts, train.labels))
    return train_path, test


def load_tiers(path: Path) -> dict[str, dict[str, float]]:
    """Tiers from a TOML file with one ``[tiers.NAME]`` table per device class."""
    import tomllib

    try:
        tiers = tomllib.loads(path.read_text())["tiers"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise ValueError(f"cannot read tiers from {path}: {exc}; expected [tiers.NAME] tables") from exc
    required = ("memory_mb", "gflops", "up_mbps", "down_mbps")
    for name, values in tiers.items():
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"tier {name!r} in {path} lacks {', '.join(missing)}")
    return {name: {k: float(v) for k, v in values.items()} for name, values in tiers.items()}


def _effective_tiers(settings: DemoSettings) -> dict[str, dict[str, float]]:
    """The tiers the fleet runs with: ``--baseline fedavg`` lifts every memory budget to the full model's."""
    tiers = {name: dict(values) for name, values in settings.tiers.items()}
    if settings.baseline == "fedavg":
        for values in tiers.values():
            values["memory_mb"] = max(values["memory_mb"], FULL_MODEL_MEMORY_MB)
    return tiers


def tiers_toml(settings: DemoSettings) -> str:
    lines = []
    for tier, values in _effective_tiers(settings).items():
        lines.append(f"[tiers.{tier}]")
        lines += [f"{k} = {v:g}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def run_demo(settings: DemoSettings) -> Path:
    """Run the demo end to end and return the run directory (its report is written there)."""
    from raffm.report import RunReport, write_report

    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{secrets.token_hex(2)}"
    run_dir = (settings.out or Path("runs") / run_id).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"RaFFM demo: run directory {run_dir}")
    train_path, test = prepare_data(settings, run_dir / "data")
    (run_dir / "tiers.toml").write_text(tiers_toml(settings))

    secrets_env = {
        "RAFFM_ENROLL_KEY": secrets.token_urlsafe(16),
        "RAFFM_OPERATOR_TOKEN": secrets.token_urlsafe(16),
        "RAFFM_TICKET_SECRET": secrets.token_urlsafe(32),
    }
    env = {**os.environ, **secrets_env, "RAFFM_AGENT_ENROLL_KEY": secrets_env["RAFFM_ENROLL_KEY"],
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    ports = {name: free_port() for name in ("registry", "extractor", "aggregator")}
    metrics = {name: free_port() for name in ports}
    addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    store = run_dir / "checkpoints"

    group = ProcessGroup(run_dir / "logs")
    report = RunReport(
        run_id=run_dir.name,
        command="raffm demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else "raffm demo",
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        settings={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items() if k != "tiers"},
        majority_rate=max(test.labels.count(y) for y in set(test.labels)) / len(test),
    )
    report.settings["tiers"] = _effective_tiers(settings)
    report.settings["metrics_ports"] = metrics
    _write_prometheus_targets(run_dir / "prometheus-targets.json", metrics)
    try:
        group.start("registry", _raffm(
            "registry", "serve", "--db", f"sqlite:///{run_dir / 'registry.db'}", "--port", str(ports["registry"]),
            "--metrics-port", str(metrics["registry"]), "--liveness-window-s", "600"), env)
        _wait_serving(group, addr["registry"], "registry")
        group.start("extractor", _raffm(
            "extractor", "serve", "--store", str(store), "--registry", addr["registry"],
            "--port", str(ports["extractor"]), "--metrics-port", str(metrics["extractor"])), env)
        group.start("aggregator", _raffm(
            "aggregator", "serve", "--data-dir", str(run_dir / "aggregator"), "--store", str(store),
            "--registry", addr["registry"], "--port", str(ports["aggregator"]),
            "--metrics-port", str(metrics["aggregator"]),
            "--model", settings.model, "--rounds", str(settings.rounds),
            "--clients-per-round", str(settings.devices), "--quorum", str(settings.devices),
            "--min-updates", "1", "--round-deadline-s", str(settings.round_deadline_s),
            "--local-steps", str(settings.local_steps), "--batch-size", str(settings.batch_size),
            "--seq-len", str(settings.seq_len), "--lr", str(settings.lr), "--wire-dtype", settings.wire_dtype,
            "--aggregation", settings.aggregation, "--seed", str(settings.seed), "--poll-wait-s", "1",
            "--no-evaluate"), env)
        _wait_serving(group, addr["extractor"], "extractor")
        _wait_serving(group, addr["aggregator"], "aggregator", timeout_s=180)
        print("services up: " + ", ".join(f"{n} {a} (metrics :{metrics[n]})" for n, a in addr.items()))
        group.start("fleet", _raffm(
            "agent", "simulate", "--devices", str(settings.devices), "--tiers", str(run_dir / "tiers.toml"),
            "--data", str(train_path), "--alpha", str(settings.alpha), "--seed", str(settings.seed),
            "--state-root", str(run_dir / "agents"), "--registry", addr["registry"],
            "--aggregator", addr["aggregator"], "--extractor", addr["extractor"], "--model", settings.model,
            "--max-rounds", str(settings.rounds), "--log-format", "json"), env)
        _follow_job(settings, group, addr["aggregator"], secrets_env["RAFFM_OPERATOR_TOKEN"], store, test, report,
                    metrics)
        final = _final_version(addr["aggregator"], secrets_env["RAFFM_OPERATOR_TOKEN"])
        print("inference scaling: cutting sub-models from the final global model ...")
        report.scaling = _scaling(settings, store, final, test)
        for p in report.scaling:
            print(f"  {p.param_fraction:6.1%} of parameters ({p.params:>11,}): test accuracy {p.accuracy:.1%}")
        paths = write_report(report, run_dir)
        print(f"report: {', '.join(str(p) for p in paths)}")
        if settings.keep_running:
            print("services keep running for Prometheus/Grafana (metrics ports above); Ctrl-C stops them")
            while True:
                group.check(allow_exit=("fleet",))
                time.sleep(2)
    except ProcessFailed as exc:
        print(f"raffm demo: {exc}", file=sys.stderr)
        _print_tail(exc.log)
        raise
    except KeyboardInterrupt:
        print("\ninterrupted: stopping services and agents ...", file=sys.stderr)
        raise
    finally:
        group.stop()
    return run_dir


def _write_prometheus_targets(path: Path, metrics: dict[str, int]) -> None:
    """A Prometheus ``file_sd_configs`` file for this run's metrics ports (see deploy/README.md)."""
    import json

    targets = [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": f"raffm-{name}"}} for name, port in metrics.items()]
    path.write_text(json.dumps(targets, indent=2) + "\n")


def _print_tail(log: Path, lines: int = 15) -> None:
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print("\n".join("  | " + line for line in tail), file=sys.stderr)


def _wait_serving(group: ProcessGroup, address: str, name: str, timeout_s: float = 60.0) -> None:
    """Block until the gRPC health service at ``address`` says SERVING (raising if the process died)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            group.check()
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not become healthy at {address} within {timeout_s:.0f} s")
            time.sleep(0.3)


def _operator_stub(address: str) -> Any:
    import grpc

    from raffm.v1 import aggregator_pb2_grpc

    return aggregator_pb2_grpc.AggregatorServiceStub(grpc.insecure_channel(address))


def _final_version(address: str, token: str) -> str:
    from raffm.v1 import aggregator_pb2

    job = _operator_stub(address).GetJob(aggregator_pb2.GetJobRequest(), metadata=[("authorization", f"Bearer {token}")],
                                         timeout=10)
    return str(job.model_version)


# Counted by the aggregator when it accepts an update: the slice bytes each participant moved, by device tier.
_TIER_COUNTERS = {"raffm_aggregator_download_bytes_total": "down", "raffm_aggregator_upload_bytes_total": "up"}


def _scrape_tier_bytes(port: int) -> dict[tuple[str, str], float]:
    """``(direction, tier) -> bytes`` from the aggregator's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _TIER_COUNTERS:
                key = (_TIER_COUNTERS[sample.name], sample.labels["tier"])
                values[key] = values.get(key, 0.0) + sample.value
    return values


def _tier_bytes(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (direction, tier), value in after.items():
        out.setdefault(tier, {"down": 0, "up": 0})[direction] += int(value - before.get((direction, tier), 0.0))
    return out


def _evaluate_version(settings: DemoSettings, store: Path, version: str, test: Any) -> float:
    from transformers import AutoTokenizer

    from raffm.checkpoints import checkpoint_store_from_url
    from raffm.models import model_from_state, resolve_model
    from raffm.training import evaluate

    checkpoints = checkpoint_store_from_url(str(store))
    model = model_from_state(checkpoints.info(version).config, checkpoints.load(version))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.model))
    return evaluate(model, test, tokenizer, seq_len=settings.seq_len)


def _scaling(settings: DemoSettings, store: Path, version: str, test: Any) -> list[Any]:
    from transformers import AutoTokenizer

    from raffm.checkpoints import checkpoint_store_from_url
    from raffm.models import model_from_state, resolve_model
    from raffm.scaling import scaling_table

    checkpoints = checkpoint_store_from_url(str(store))
    model = model_from_state(checkpoints.info(version).config, checkpoints.load(version))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings.model))
    return scaling_table(model, test, tokenizer, seq_len=settings.seq_len)


def _follow_job(
    settings: DemoSettings, group: ProcessGroup, address: str, token: str, store: Path, test: Any, report: Any,
    metrics: dict[str, int],
) -> None:
    """Print a line per closed round until the job ends; fill ``report.rounds``."""
    import grpc
    from tqdm import tqdm

    from raffm.report import RoundRecord
    from raffm.v1 import aggregator_pb2

    stub = _operator_stub(address)
    auth = [("authorization", f"Bearer {token}")]
    job = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=auth, timeout=10)
    report.initial_accuracy = _evaluate_version(settings, store, job.model_version, test)
    print(f"round 0: global test accuracy {report.initial_accuracy:.1%} (majority class {report.majority_rate:.1%})")
    seen: set[str] = set()
    before = _scrape_tier_bytes(metrics["aggregator"])
    bar = tqdm(total=settings.rounds, desc="rounds", unit="round", disable=not sys.stderr.isatty())
    done_states = (aggregator_pb2.JOB_STATE_COMPLETED, aggregator_pb2.JOB_STATE_FAILED, aggregator_pb2.JOB_STATE_CANCELLED)
    while True:
        group.check(allow_exit=("fleet",))
        try:
            job = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=auth, timeout=10)
            rounds = stub.ListRounds(aggregator_pb2.ListRoundsRequest(page_size=1000), metadata=auth, timeout=10).rounds
        except grpc.RpcError as exc:
            print(f"(aggregator not answering: {exc.code().name}; retrying)", file=sys.stderr)
            time.sleep(2)
            continue
        for r in sorted(rounds, key=lambda r: r.index):
            if r.round_id in seen or r.state not in (aggregator_pb2.ROUND_STATE_CLOSED, aggregator_pb2.ROUND_STATE_FAILED):
                continue
            seen.add(r.round_id)
            after = _scrape_tier_bytes(metrics["aggregator"])
            accuracy = (_evaluate_version(settings, store, r.result_model_version, test)
                        if r.result_model_version else None)
            duration = (r.closed_at.ToDatetime() - r.opened_at.ToDatetime()).total_seconds()
            record = RoundRecord(
                index=r.index, accuracy=accuracy, participants=r.accepted, assigned=r.assigned, dropouts=r.dropped,
                bytes_down=r.bytes_down, bytes_up=r.bytes_up, full_fedavg_bytes=r.full_model_bytes,
                duration_s=duration, mean_train_loss=r.mean_train_loss or None, bytes_by_tier=_tier_bytes(before, after),
            )
            before = after
            report.rounds.append(record)
            bar.update(1)
            acc = "n/a" if accuracy is None else f"{accuracy:.1%}"
            tqdm.write(
                f"round {r.index}: global test accuracy {acc}, participants {r.accepted}/{r.assigned}, "
                f"dropouts {r.dropped}, down {r.bytes_down / 2**20:.1f} MiB, up {r.bytes_up / 2**20:.1f} MiB, "
                f"full-model FedAvg would move {r.full_model_bytes / 2**20:.1f} MiB, {duration:.0f} s"
            )
        if job.state in done_states:
            break
        time.sleep(1.0)
    bar.close()
    if job.state != aggregator_pb2.JOB_STATE_COMPLETED:
        raise RuntimeError(f"the job ended as {aggregator_pb2.JobState.Name(job.state)}; see {group.log_dir}")


def register(subparsers: Any) -> None:
    from raffm.commands import wire_dtype_arg

    parser = subparsers.add_parser(
        "demo",
        help="run a real federated fine-tuning job on this machine (services + simulated fleet) and write a report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DemoSettings()
    parser.add_argument("--devices", type=int, default=d.devices, help=f"simulated devices (default: {d.devices})")
    parser.add_argument("--rounds", type=int, default=d.rounds, help=f"federated rounds (default: {d.rounds})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data split and training (default: 0)")
    parser.add_argument("--model", default=d.model, help="HF model id or folder (default: the shipped MiniLM)")
    parser.add_argument("--data", default=d.data,
                        help="rotten_tomatoes (shipped) or a CSV/JSON-lines file with text,label (default: rotten_tomatoes)")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    parser.add_argument("--baseline", choices=("none", "fedavg"), default=d.baseline,
                        help="fedavg: every device trains the full model, for comparison")
    parser.add_argument("--aggregation", choices=("coverage", "paper"), default=d.aggregation,
                        help="coverage-weighted sliced FedAvg (default) or the paper code's rule")
    parser.add_argument("--local-steps", type=int, default=d.local_steps, help=f"optimizer steps per device per round ({d.local_steps})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet label skew of the split; small = non-IID")
    parser.add_argument("--test-size", type=int, default=d.test_size, help="held-out examples the server keeps")
    parser.add_argument("--max-train", type=int, default=0, help="cap on training examples shared by the fleet (0: all)")
    parser.add_argument("--wire-dtype", type=wire_dtype_arg, default=d.wire_dtype, metavar="DTYPE",
                        help="float32, float16 or bfloat16 (fp32/fp16/bf16 too); default: %(default)s")
    parser.add_argument("--round-deadline-s", type=float, default=d.round_deadline_s)
    parser.add_argument("--tiers", type=Path, help="device tiers TOML ([tiers.NAME] memory_mb, gflops, up_mbps, "
                        "down_mbps, share); default: sbc, phone, jetson and server tiers sized for MiniLM")
    parser.add_argument("--keep-running", action="store_true", help="leave the services up after the report")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    values = {k: v for k, v in vars(args).items() if k in DemoSettings.__dataclass_fields__ and k != "tiers"}
    settings = DemoSettings(**values)
    if args.tiers is not None:
        settings.tiers = load_tiers(args.tiers)
    if settings.devices < 1 or settings.rounds < 1:
        raise ValueError("--devices and --rounds must be at least 1")
    try:
        run_demo(settings)
    except ProcessFailed:
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
