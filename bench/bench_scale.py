"""Scale-out: a thousand devices on one machine, the object store against the directory store, and how the
aggregator grows with participants. Every service runs as its own process (`raffm registry|extractor|aggregator
serve`) on loopback; three parts, side by side in one run:

1. control: ``--devices`` simulated devices (`raffm agent simulate --control-plane`, threads in ``--fleet-procs``
   processes) register with one registry and poll one aggregator; a round with ``--participants`` devices must close.
   Reported per database (SQLite, then PostgreSQL when a URL is given): registrations, p50/p99 of PollRound and
   Heartbeat as the devices see them (and as the servers' histograms bound them), the round's open-to-close time.
2. store: the same round of scripted devices (download the slice, upload a zero delta) over the directory store and
   over an S3-compatible object store (moto's server mode, a real HTTP server process): slice download MB/s, cold
   (the extractor builds the slice from the store) and warm (from its cache), and the round time.
3. memory: the aggregator's resident memory and its round-close time (last update accepted -> next version written)
   at 10, 100 and 200 participants, each with a fresh aggregator process.

    .venv/bin/python bench/bench_scale.py --json out.json                # default: 1,000 devices, 200 participants
    .venv/bin/python bench/bench_scale.py --quick                        # 60 devices, 20 participants, small sizes
    .venv/bin/python bench/bench_scale.py --parts control --postgres-url postgresql+psycopg://...

PostgreSQL is measured when --postgres-url or RAFFM_TEST_POSTGRES_URL is given (a throw-away database is created).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_agent.client import aggregator_stub, extractor_stub  # noqa: E402
from raffm.v1 import aggregator_pb2, common_pb2, registry_pb2, registry_pb2_grpc  # noqa: E402
from raffm_app.processes import ProcessGroup, raffm_command, serve_on_free_ports, wait_serving  # noqa: E402
from services.common.testing import postgres_database, s3_server  # noqa: E402

KEY, OPERATOR, SECRET = "bench-enroll-key", "bench-operator-token", "bench-ticket-secret-0123456789"
SERVICES = ("registry", "aggregator", "extractor")
OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]
TIERS = """
[tiers.phone]
memory_mb = 500
gflops = 5
up_mbps = 10
down_mbps = 40
share = 3
tier = "phone"

[tiers.laptop]
memory_mb = 2000
gflops = 50
up_mbps = 50
down_mbps = 200
tier = "laptop"
"""


# ------------------------------------------------------------------------------------------------ the services


@dataclass
class Stack:
    """Registry, aggregator and extractor as processes; ``metrics(name)`` scrapes one, ``pid(name)`` its process."""

    root: Path
    db_url: str  # PostgreSQL: one database for both services; SQLite: each service gets its own file beside it
    store_url: str
    job: list[str]
    env: dict[str, str] = field(default_factory=dict)
    liveness_s: float = 30.0
    group: ProcessGroup | None = None
    ports: dict[str, dict[str, int]] = field(default_factory=dict)  # each service's {"grpc": ..., "metrics": ...}

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]['grpc']}"

    def database(self, service: str) -> str:
        """SQLite is each service's embedded database: two processes writing one file would wait on each other's
        locks, which no deployment does."""
        if self.db_url.startswith("sqlite:///"):
            path = Path(self.db_url.removeprefix("sqlite:///"))
            return f"sqlite:///{path.with_name(f'{path.stem}-{service}{path.suffix}')}"
        return self.db_url

    def __enter__(self) -> Stack:
        env = dict(os.environ, RAFFM_OPERATOR_TOKEN=OPERATOR, RAFFM_TICKET_SECRET=SECRET, RAFFM_ENROLL_KEY=KEY,
                   RAFFM_AGENT_ENROLL_KEY=KEY, **self.env)
        self.env = env
        group = self.group = ProcessGroup(self.root / "logs", grace_s=10)

        def start(name: str, *argv: str) -> None:
            group.start(name, raffm_command(name, "serve", *argv, *serve_on_free_ports(group, name), "--grace-s", "1",
                                            "--log-level", "WARNING"), env)

        try:
            start("registry", "--db", self.database("registry"), "--liveness-window-s", str(self.liveness_s))
            self.ports["registry"] = wait_serving(group, "registry")
            start("aggregator", "--db", self.database("aggregator"), "--store", self.store_url, "--data-dir",
                  str(self.root / "agg"), "--registry", self.address("registry"), *self.job)
            start("extractor", "--store", self.store_url, "--registry", self.address("registry"))
            # the aggregator and the extractor load torch side by side; a loaded machine may take minutes
            for name in ("aggregator", "extractor"):
                self.ports[name] = wait_serving(group, name, timeout_s=300)
        except BaseException:
            group.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.group is not None
        self.group.stop()

    def pid(self, name: str) -> int:
        assert self.group is not None
        return self.group.procs[name][0].pid

    def metrics(self, name: str) -> str:
        url = f"http://127.0.0.1:{self.ports[name]['metrics']}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    def aggregator(self) -> Any:
        return aggregator_stub(grpc.insecure_channel(self.address("aggregator"), OPTIONS))  # the agent's

    def rounds(self) -> list[Any]:
        for attempt in range(10):  # an overloaded machine may miss a deadline; the bench must not stop for it
            try:
                reply = self.aggregator().ListRounds(aggregator_pb2.ListRoundsRequest(), timeout=60,
                                                     metadata=(("authorization", f"Bearer {OPERATOR}"),))
                return sorted(reply.rounds, key=lambda r: r.index)
            except grpc.RpcError as exc:
                if attempt == 9 or exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED,  # type: ignore[attr-defined]
                                                      grpc.StatusCode.UNAVAILABLE):
                    raise
                time.sleep(2)
        raise AssertionError("unreachable")


def job_args(model: str, participants: int, *, rounds: int = 1, poll_wait_s: float = 5.0) -> list[str]:
    return ["--model", model, "--num-labels", "2", "--rounds", str(rounds), "--clients-per-round", str(participants),
            "--quorum", str(participants), "--min-updates", str(participants), "--round-deadline-s", "900",
            "--local-steps", "1", "--batch-size", "2", "--seq-len", "8", "--poll-wait-s", str(poll_wait_s),
            "--no-evaluate"]


def tiny_model(folder: Path) -> Path:
    """A 2-layer, hidden-32 random BERT with the real MiniLM tokenizer (vocab 30522): the control-plane job."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from raffm.models import default_model_path

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=2)).save_pretrained(folder)  # type: ignore[call-arg]
        AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


def medium_model(folder: Path) -> Path:
    """A 4-layer, hidden-256 random BERT (vocab 8192; 21 MB in fp32): big enough that the aggregator's per-model
    state shows in its memory, small enough for 200 uploads on one machine."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(
            vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=64, num_labels=2)).save_pretrained(folder)  # type: ignore[call-arg]
    return folder


def histogram_quantile(text: str, metric: str, method: str, q: float) -> float | None:
    """The upper bound (ms) of the bucket holding the q-quantile of ``metric`` for ``method`` (code OK)."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{metric}_bucket{{") and f'method="{method}"' in line and 'code="OK"' in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    if not buckets:
        return None
    total = buckets[float("inf")]
    for upper in sorted(buckets):
        if buckets[upper] >= q * total:
            return upper * 1000
    return None


def handled(text: str, method: str) -> int:
    """How many calls of ``method`` a service completed, any status (its ``raffm_grpc_server_handled`` counter)."""
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("raffm_grpc_server_handled_total{") and f'method="{method}"' in line))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    import math

    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# ------------------------------------------------------------------------------------------------ part 1: control


def part_control(backend: str, db_url: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    model = tiny_model(root.parent / "tiny-model")
    root.mkdir(parents=True, exist_ok=True)
    (root / "tiers.toml").write_text(TIERS)
    job = job_args(str(model), args.participants, poll_wait_s=args.poll_wait_s)
    with Stack(root, db_url, f"file://{root / 'checkpoints'}", job, liveness_s=args.liveness_s) as stack:
        group = ProcessGroup(root / "fleet-logs", grace_s=30)
        crowd = args.devices - args.probe_devices
        per = [crowd // args.fleet_procs + (i < crowd % args.fleet_procs) for i in range(args.fleet_procs)]
        # The simulator runs at a lower CPU priority than the services: on one machine it stands in for devices
        # elsewhere, and its own CPU use must not be what the services' latency measures. A few probe devices run
        # in a process of their own at normal priority: their latency is the services' (plus the CPU queue), not
        # that of a Python process hosting hundreds of agents behind one interpreter lock.
        fleets = [(f"fleet{i}", n, ["nice", "-n", "15"]) for i, n in enumerate(per)]
        fleets += [("probe", args.probe_devices, [])] if args.probe_devices else []
        for name, n, prefix in fleets:
            group.start(name, [*prefix, *raffm_command(
                "agent", "simulate", "--control-plane", "--mode", "threads", "--devices", str(n),
                "--tiers", str(root / "tiers.toml"), "--name-prefix", name, "--state-root", str(root / name),
                "--registry", stack.address("registry"), "--aggregator", stack.address("aggregator"),
                "--extractor", stack.address("extractor"), "--model", str(model), "--max-rounds", "1",
                "--duration-s", str(args.duration_s), "--start-spread-s", str(args.spread_s),
                "--stats-json", str(root / f"{name}.json"), "--log-format", "json")], stack.env)
        t0 = time.monotonic()
        load: list[float] = []
        closed = None
        samplers = {name: RssSampler(stack.pid(name)) for name in SERVICES}  # what each service's pod must request
        cpu_before = {name: cpu_seconds(stack.pid(name)) for name in SERVICES}
        with ExitStack() as sampling:
            for sampler in samplers.values():
                sampling.enter_context(sampler)
            while time.monotonic() - t0 < args.duration_s + 120:
                assert stack.group is not None
                stack.group.check()  # the services must stay up; a fleet process's exit status is in its stats
                rounds = stack.rounds()
                if rounds and rounds[0].state == aggregator_pb2.ROUND_STATE_CLOSED and closed is None:
                    closed = rounds[0]
                if all(p.poll() is not None for p, _, _ in group.procs.values()):
                    break
                load.append(os.getloadavg()[0])
                time.sleep(1.0)
        cpu = {name: cpu_seconds(stack.pid(name)) - cpu_before[name] for name in SERVICES}
        fleet_s = time.monotonic() - t0
        group.stop()
        server = {"registry": stack.metrics("registry"), "aggregator": stack.metrics("aggregator")}
        rounds = stack.rounds()
    missing = [name for name, _, _ in fleets if not (root / f"{name}.json").exists()]
    if missing:
        raise RuntimeError(f"fleet process(es) {missing} wrote no stats; see {root / 'fleet-logs'}")
    stats = {name: json.loads((root / f"{name}.json").read_text()) for name, _, _ in fleets}

    def latency(names: list[str]) -> dict[str, dict[str, float]]:
        samples: dict[str, list[float]] = {}
        for name in names:
            for k, v in stats[name]["samples_ms"].items():
                samples.setdefault(k, []).extend(v)
        return {call: {"count": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
                       "max": max(values)} for call, values in samples.items() if values}

    rnd = rounds[0] if rounds else None
    out: dict[str, Any] = {
        "backend": backend, "devices": args.devices, "registered": sum(s["registered"] for s in stats.values()),
        "outcomes": {k: sum(s["outcomes"].get(k, 0) for s in stats.values()) for s in stats.values()
                     for k in s["outcomes"]},
        "agent_errors": [e for s in stats.values() for e in s["errors"]][:10],
        "load_avg_1m": {"mean": statistics.fmean(load) if load else 0.0, "max": max(load, default=0.0)},
        "peak_rss_mb": {name: sampler.peak for name, sampler in samplers.items()},
        "cpu_s": cpu, "fleet_s": fleet_s,
        "registry_calls": {m: handled(server["registry"], m) for m in ("VerifyToken", "Heartbeat", "GetDevice",
                                                                        "Register")},
        "latency_ms": latency(list(stats)), "probe_latency_ms": latency(["probe"] if args.probe_devices else []),
        "server_bound_ms": {},
        "round": None if rnd is None else {
            "state": aggregator_pb2.RoundState.Name(rnd.state), "accepted": rnd.accepted, "assigned": rnd.assigned,
            "seconds": (rnd.closed_at.ToNanoseconds() - rnd.opened_at.ToNanoseconds()) / 1e9 if rnd.closed_at.seconds
            else None},
    }
    for name, metric_text, method in (("PollRound", server["aggregator"], "PollRound"),
                                      ("Heartbeat", server["registry"], "Heartbeat")):
        out["server_bound_ms"][name] = {q: histogram_quantile(metric_text, "raffm_grpc_server_handling_seconds",
                                                              method, v) for q, v in (("p50", 0.5), ("p99", 0.99))}
    return out


# ------------------------------------------------------------------------------------------------ scripted devices


@dataclass
class Scripted:
    name: str
    device_id: str
    md: tuple[tuple[str, str], ...]


def register(stack: Stack, n: int, memory_mb: int, prefix: str = "d") -> list[Scripted]:
    stub = registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(stack.address("registry"), OPTIONS))
    out = []
    for i in range(n):
        profile = common_pb2.DeviceProfile(train_memory_mb=memory_mb, gflops=100, up_mbps=1000, down_mbps=1000,
                                           tier="server" if memory_mb >= 4000 else "laptop")
        r = stub.Register(registry_pb2.RegisterRequest(enroll_key=KEY, name=f"{prefix}{i}", profile=profile),
                          timeout=60)
        out.append(Scripted(f"{prefix}{i}", r.device_id, (("authorization", f"Bearer {r.token}"),)))
    return out


def poll_all(stack: Stack, devices: list[Scripted]) -> list[Any]:
    stub = stack.aggregator()
    out = []
    for d in devices:
        for _ in range(600):
            reply = stub.PollRound(aggregator_pb2.PollRequest(device_id=d.device_id), metadata=d.md, timeout=60)
            if reply.WhichOneof("action") == "assignment":
                out.append(reply.assignment)
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{d.name} got no assignment")
    return out


def download(stack: Stack, d: Scripted, assignment: Any) -> tuple[dict[str, Any], int, float]:
    """The slice's tensors, its bytes and the seconds the stream took."""
    from edge_agent.transfer import download_once
    from raffm.reassembly import MemorySink

    stub = extractor_stub(grpc.insecure_channel(stack.address("extractor"), OPTIONS))  # the agent's
    sink = MemorySink()
    t0 = time.perf_counter()
    receiver = download_once(stub, assignment.ticket, sink, metadata=d.md)
    receiver.reassembler.finish()
    seconds = time.perf_counter() - t0
    return sink.tensors, receiver.manifest.total_bytes, seconds


def upload_zero(stack: Stack, d: Scripted, assignment: Any, tensors: dict[str, Any]) -> None:
    import torch

    from edge_agent.transfer import upload_once
    from raffm.wire import WirePayload, wire_dtype_name

    frozen = set(assignment.recipe.frozen_tensors)
    delta = {n: torch.zeros_like(t) for n, t in tensors.items() if n not in frozen}
    # the trained tensors come down at the job's wire dtype (a frozen vocabulary may come at half precision)
    dtype = wire_dtype_name(next(iter(delta.values())).dtype)
    ack = upload_once(stack.aggregator(), assignment.ticket, 8, WirePayload.from_state(delta, dtype), metadata=d.md)
    if not ack.accepted:
        raise RuntimeError(f"upload of {d.name} refused: {ack}")


def wait_closed(stack: Stack, index: int, timeout_s: float = 600) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        rounds = [r for r in stack.rounds() if r.index == index]
        if rounds and rounds[0].state == aggregator_pb2.ROUND_STATE_CLOSED:
            return rounds[0]
        time.sleep(0.02)
    raise TimeoutError(f"round {index} did not close")


# ------------------------------------------------------------------------------------------------ part 2: store


def part_store(kind: str, store_url: str, env: dict[str, str], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    devices_n = args.store_devices
    job = job_args(args.store_model, devices_n, rounds=2, poll_wait_s=0.2)
    with Stack(root, f"sqlite:///{root / 'db.sqlite'}", store_url, job, env=env) as stack:
        big = register(stack, devices_n // 2, 100_000, "full")
        small = register(stack, devices_n - devices_n // 2, args.small_budget_mb, "small")
        devices = [d for pair in zip(big, small) for d in pair]
        rounds = []
        cold: list[float] = []
        warm: list[float] = []
        for index in (1, 2):
            t0 = time.perf_counter()
            assignments = poll_all(stack, devices)
            seen: set[bytes] = set()
            for d, a in zip(devices, assignments):
                tensors, nbytes, seconds = download(stack, d, a)
                key = a.spec.SerializeToString()
                (warm if key in seen else cold).append(nbytes / 1e6 / seconds)
                seen.add(key)
                upload_zero(stack, d, a, tensors)
            rnd = wait_closed(stack, index)
            rounds.append(time.perf_counter() - t0)
        extractor_rss = rss_mb(stack.pid("extractor"))
    return {"store": kind, "devices": devices_n, "round_s": rounds, "cold_mb_s": cold, "warm_mb_s": warm,
            "extractor_rss_mb": extractor_rss, "last_round": rnd.index}


# ------------------------------------------------------------------------------------------------ part 3: memory


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """Peak VmRSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def part_memory(participants: int, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    model = medium_model(root.parent / "medium-model")
    job = job_args(str(model), participants, rounds=2, poll_wait_s=0.2)
    with Stack(root, f"sqlite:///{root / 'db.sqlite'}", f"file://{root / 'checkpoints'}", job) as stack:
        devices = register(stack, participants, 100_000)
        assignments = poll_all(stack, devices)
        tensors, _, _ = download(stack, devices[0], assignments[0])  # every device has the same (full) slice
        pid = stack.pid("aggregator")
        before = rss_mb(pid)
        with RssSampler(pid) as sampler:
            with ThreadPoolExecutor(args.upload_concurrency) as pool:
                list(pool.map(lambda da: upload_zero(stack, da[0], da[1], tensors), zip(devices, assignments)))
            last_ack = time.time()
            rnd = wait_closed(stack, 1)
        closed_at = rnd.closed_at.ToNanoseconds() / 1e9
        after = rss_mb(pid)
        fold = stack.metrics("aggregator")
    fold_sum = next((float(x.split()[-1]) for x in fold.splitlines()
                     if x.startswith("raffm_aggregator_fold_seconds_sum")), 0.0)
    model_mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    return {"participants": participants, "model_mb": model_mb, "rss_before_mb": before, "rss_peak_mb": sampler.peak,
            "rss_after_mb": after, "close_s": max(0.0, closed_at - last_ack),
            "fold_ms_mean": 1000 * fold_sum / participants, "accepted": rnd.accepted}


# ------------------------------------------------------------------------------------------------ report


def render(data: dict[str, Any]) -> str:
    out = [f"{data['cores']} cores; every service its own process on loopback; command: `{data['command']}`.", ""]
    if data.get("control"):
        c0 = data["control"][0]
        out += [f"### Control plane: {c0['devices']} devices, a round of {data['settings']['participants']} "
                f"participants (poll wait {data['settings']['poll_wait_s']} s, heartbeat every "
                f"{data['settings']['liveness_s'] / 3:g} s, {data['settings']['fleet_procs']} fleet processes)", "",
                "| database | registered | PollRound p50 / p99 ms (devices) | Heartbeat p50 / p99 ms (devices) | "
                f"PollRound p50 / p99 ms ({data['settings'].get('probe_devices', 0)} probe devices) | "
                "PollRound p50 / p99 bound, server ms | Heartbeat p50 / p99 bound, server ms | round: accepted, open to "
                "close | machine load (1-min avg: mean, max) | peak RSS MiB: " + ", ".join(SERVICES) + " | CPU s: "
                + ", ".join(SERVICES) + " | registry calls: VerifyToken, Heartbeat, GetDevice |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]

        def cell(lat: dict[str, float]) -> str:
            return f"{lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} ({lat.get('count', 0)} calls)"

        for c in data["control"]:
            poll, hb = c["latency_ms"].get("aggregator.PollRound", {}), c["latency_ms"].get("registry.Heartbeat", {})
            probe = c.get("probe_latency_ms", {}).get("aggregator.PollRound", {})
            rnd = c["round"] or {}
            close = f"{rnd.get('accepted')}, {rnd['seconds']:.1f} s" if rnd.get("seconds") else f"{rnd.get('state')}"
            out.append(f"| {c['backend']} | {c['registered']}/{c['devices']} | {cell(poll)} | {cell(hb)} | {cell(probe)} | "
                       f"<= {c['server_bound_ms']['PollRound']['p50']} / {c['server_bound_ms']['PollRound']['p99']} | "
                       f"<= {c['server_bound_ms']['Heartbeat']['p50']} / {c['server_bound_ms']['Heartbeat']['p99']} | "
                       f"{close} | {c['load_avg_1m']['mean']:.1f}, {c['load_avg_1m']['max']:.1f} | "
                       + ", ".join(f"{c['peak_rss_mb'][n]:.0f}" for n in SERVICES) + " | "
                       + ", ".join(f"{c['cpu_s'][n]:.0f}" for n in SERVICES) + " | "
                       + ", ".join(f"{c['registry_calls'][m]:,}" for m in ("VerifyToken", "Heartbeat", "GetDevice"))
                       + " |")
        out.append("")
    if data.get("store"):
        out += [f"### Object store vs directory store ({data['settings']['store_model']}, "
                f"{data['store'][0]['devices']} scripted devices, 2 rounds)", "",
                "| store | slice download MB/s, cold (built from the store) | warm (cached) | round time s (1, 2) | "
                "extractor RSS MiB |", "|---|---|---|---|---|"]
        for s in data["store"]:
            out.append(f"| {s['store']} | {statistics.median(s['cold_mb_s']):.0f} (median of {len(s['cold_mb_s'])}) | "
                       f"{statistics.median(s['warm_mb_s']):.0f} | "
                       f"{', '.join(f'{x:.2f}' for x in s['round_s'])} | {s['extractor_rss_mb']:.0f} |")
        out.append("")
    if data.get("memory"):
        m0 = data["memory"][0]
        out += [f"### Aggregator memory and round close vs participants (model {m0['model_mb']:.1f} MB fp32)", "",
                "| participants | RSS before round MiB | peak RSS during uploads and close MiB | close s (last update "
                "-> next version) | fold ms per update |", "|---|---|---|---|---|"]
        for m in data["memory"]:
            out.append(f"| {m['participants']} | {m['rss_before_mb']:.0f} | {m['rss_peak_mb']:.0f} | "
                       f"{m['close_s']:.2f} | {m['fold_ms_mean']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CI): 60 devices, 20 participants")
    parser.add_argument("--parts", default="control,store,memory", help="comma-separated: control,store,memory")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--participants", type=int, default=200)
    parser.add_argument("--fleet-procs", type=int, default=4, help="simulator processes the devices are split over")
    parser.add_argument("--probe-devices", type=int, default=10,
                        help="of the devices, how many run in a process of their own at normal priority")
    parser.add_argument("--duration-s", type=float, default=300.0, help="how long the fleet runs")
    parser.add_argument("--spread-s", type=float, default=60.0, help="devices start evenly over this many seconds")
    parser.add_argument("--poll-wait-s", type=float, default=5.0, help="the job's poll interval (product default 5)")
    parser.add_argument("--liveness-s", type=float, default=90.0,
                        help="registry liveness window; devices heartbeat every third of it (product default 90)")
    parser.add_argument("--store-model", default="minilm", help="model of the store part (default: the shipped MiniLM)")
    parser.add_argument("--store-devices", type=int, default=8)
    parser.add_argument("--small-budget-mb", type=int, default=250, help="training budget of half the store devices")
    parser.add_argument("--sizes", default="10,100,200", help="participants of the memory part")
    parser.add_argument("--upload-concurrency", type=int, default=8)
    parser.add_argument("--postgres-url", default=os.environ.get("RAFFM_TEST_POSTGRES_URL", ""))
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--work-dir", help="keep the services' logs, databases and fleet stats here (default: a "
                                           "temporary directory, removed afterwards)")
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.participants, args.fleet_procs, args.probe_devices = 60, 20, 2, 2
        args.duration_s, args.spread_s, args.poll_wait_s, args.liveness_s = 20.0, 5.0, 1.0, 30.0
        args.sizes, args.store_devices = "4,8", 4
        args.store_model = "" if args.store_model == "minilm" else args.store_model
    if not 0 <= args.probe_devices < args.devices:
        parser.error(f"--probe-devices is {args.probe_devices}; it must be at least 0 and below --devices")
    parts = set(args.parts.split(","))
    command = "bench/bench_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data: dict[str, Any] = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                            "cores": os.cpu_count(), "command": command.strip(), "settings": vars(args) | {},
                            "control": [], "store": [], "memory": []}
    t_start = time.perf_counter()
    work = nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory(prefix="raffm-bench-scale-")
    with work as tmp:
        root = Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not args.store_model:
            args.store_model = str(medium_model(root / "medium-model"))
        data["settings"]["store_model"] = args.store_model
        if "control" in parts:
            backends: list[tuple[str, Any]] = [("sqlite", nullcontext(f"sqlite:///{root / 'control.db'}"))]
            if args.postgres_url:
                backends.append(("postgresql", postgres_database(args.postgres_url, prefix="raffm_bench_scale")))
            for backend, database in backends:
                with database as url:
                    print(f"control plane on {backend}: {args.devices} devices ...", flush=True)
                    data["control"].append(part_control(backend, url, root / f"control-{backend}", args))
                    print(json.dumps(data["control"][-1]["latency_ms"]), flush=True)
        if "store" in parts:
            print("directory store ...", flush=True)
            data["store"].append(part_store("directory", f"file://{root / 'store-dir' / 'checkpoints'}", {},
                                            root / "store-dir", args))
            with s3_server(str(root / "s3.log")) as s3:
                bucket = s3.create_bucket()
                print(f"object store (S3 API at {s3.endpoint}) ...", flush=True)
                data["store"].append(part_store("object store (S3 API)", f"s3://{bucket}/raffm",
                                                {**s3.env, "RAFFM_STORE_ENDPOINT": s3.endpoint},
                                                root / "store-s3", args))
        if "memory" in parts:
            for n in (int(x) for x in args.sizes.split(",")):
                print(f"aggregator with {n} participants ...", flush=True)
                data["memory"].append(part_memory(n, root / f"memory-{n}", args))
    data["seconds"] = time.perf_counter() - t_start
    print()
    print(render(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    failed = [c["backend"] for c in data["control"]
              if c["registered"] < c["devices"] or not (c["round"] or {}).get("seconds")]
    if failed:
        print(f"FAILED: not every device registered or the round did not close on {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
