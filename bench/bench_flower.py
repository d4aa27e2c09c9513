"""A FedAvg round through Flower (two ways) and through ours, on loopback: bytes on the wire and framework time.

The same model (MiniLM with a 2-label head, fp32; ``--quick``: a small random BERT), the same number of clients, the
same rounds, and clients that train for **zero** steps, so what remains of a round is serialization, transport both
ways and aggregation. Three frameworks, one run:

- Flower 1.42, legacy gRPC transport (``start_server`` / ``start_client``, deprecated since 1.13), in its own virtual
  environment (``bench/flower_env.sh``; Flower's side needs numpy only, ``_flower_side.py``). Server and clients are
  separate processes; a client returns the parameters it received. Round time: from the end of client sampling to
  the end of ``FedAvg.aggregate_fit`` (measured in the server by a strategy subclass).
- Flower 1.42, deployment runtime (its default): ``flower-superlink`` and one ``flower-supernode`` per client, all
  ``--insecure`` on 127.0.0.1, the Flower App of ``_flower_app.py`` (Message API: a ``ServerApp`` running the
  message-based ``FedAvg`` on a ``Grid``, a ``ClientApp`` with ``@app.train()``) started by ``flwr run`` against a
  SuperLink connection in a private ``FLWR_HOME``. Each SuperLink and SuperNode runs the apps through its own
  ``flower-superexec``, which starts a ``flwr-serverapp`` / ``flwr-clientapp`` process per task. In 1.42 every API
  (Fleet, Control, Runtime) is protobuf over HTTP. A reply carries the received arrays with a per-node mark in the
  lowest mantissa bits (``_flower_app.py`` says why: the object store is content-addressed). Round time: from the
  end of node sampling to the end of ``FedAvg.aggregate_train``, measured in the ServerApp.
- RaFFM: registry, extractor and aggregator in this process on 127.0.0.1 (real SQLite, a checkpoint directory,
  durable staging with fsync), clients as threads with sync gRPC stubs: PollRound, DownloadSlice (full spec),
  UploadUpdate (zero delta). Round time: from releasing the clients to the round's state becoming CLOSED (the new
  model version committed). Salience reordering of the new version is off unless ``--reorder`` (FedAvg has none).

Bytes: a second pass of every framework runs through a byte-counting TCP relay on 127.0.0.1 (the same relay class
for all), counting both directions of every client connection: legacy Flower's client-server streams; every HTTP
connection between the SuperNodes and the SuperLink from the nodes' start to the end of the run (registration,
heartbeats, polls, the FAB, messages and array chunks; ``flwr run`` and the ServerApp reach the SuperLink directly);
ours without registration (once per device, before the rounds). Reported per round and against the tensor bytes.

Baseline: one raw TCP socket on 127.0.0.1 moving a round's tensor bytes (2 x clients x tensor bytes: every download
and upload) in 1 MiB ``sendall`` calls (``bench_transfer.raw_socket_mb_s``, best of 3); each framework's median
round time is reported as a multiple of that time.

    .venv/bin/python bench/bench_flower.py [--clients 8 --rounds 3] [--quick] [--json out.json]

If Flower's environment cannot be created, or one of Flower's modes cannot run, the bench prints why
(``<framework> skipped: <why>``), still reports the others and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_transfer import CountingRelay, raw_socket_mb_s  # noqa: E402

from raffm_app.processes import free_port  # noqa: E402

FLOWER_VENV = BENCH / ".flower" / ".venv"
MiB = 1 << 20


class Skip(Exception):
    """Flower cannot be benchmarked here; the message says why."""


def wait_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise Skip(f"{name} exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise Skip(f"{name} did not listen on port {port} within {timeout:.0f} s")


class Children:
    """Flower's processes of one run, each in its own session with a log in ``work``; ``close`` ends them all."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env = work, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("wb") as log:
            p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(p)
        return p

    def tail(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")[-600:]

    def close(self) -> None:
        """SIGTERM to each session (a SuperLink or SuperNode starts its own SuperExec and app processes), then KILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in reversed(self.procs):  # clients before their server
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            for p in self.procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass


def flower_python(install: bool) -> Path:
    python = FLOWER_VENV / "bin" / "python"
    ok = python.exists() and subprocess.run([str(python), "-c", "import flwr, numpy"], capture_output=True).returncode == 0
    if not ok and install:
        print(f"creating Flower's environment with bench/flower_env.sh (once) ...", flush=True)
        r = subprocess.run(["bash", str(BENCH / "flower_env.sh"), str(FLOWER_VENV)], capture_output=True, text=True)
        if r.returncode != 0:
            raise Skip(f"bench/flower_env.sh failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-400:]}")
        ok = subprocess.run([str(python), "-c", "import flwr, numpy"], capture_output=True).returncode == 0
    if not ok:
        raise Skip(f"no Flower environment at {FLOWER_VENV} (run bench/flower_env.sh, or drop --no-install)")
    return python


def flower_version(python: Path) -> str:
    r = subprocess.run([str(python), "-c", "import flwr; print(flwr.__version__)"], capture_output=True, text=True)
    return r.stdout.strip()


# -- the model ---------------------------------------------------------------------------------------------------------


def build_model(quick: bool) -> tuple[Any, str]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if quick:
        config = BertConfig(vocab_size=8000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=512)  # 2 labels: the default
        return BertForSequenceClassification(config).eval(), "random BERT hidden 128, 2 layers, vocab 8000"
    from raffm.models import load_global_model

    return load_global_model(), "MiniLM-L6 (all-MiniLM-L6-v2) + 2-label head"


def float_state(model: Any) -> dict[str, Any]:
    return {n: t.detach().float().contiguous() for n, t in model.state_dict().items() if t.is_floating_point()}


# -- Flower ------------------------------------------------------------------------------------------------------------


def flower_env(python: Path, home: Path) -> dict[str, str]:
    """Flower's venv first on PATH (SuperLink and SuperNode start ``flower-superexec`` from it), state under ``home``."""
    return {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONWARNINGS": "ignore"}


def counted(result: dict[str, Any], counter: CountingRelay | None) -> dict[str, Any]:
    if counter is not None:
        time.sleep(0.5)  # let the relay pumps drain
        result["bytes_up"], result["bytes_down"] = counter.up, counter.down
    return result


def run_flower(python: Path, weights: Path, clients: int, rounds: int, *, relay: bool, work: Path) -> dict[str, Any]:
    """Legacy transport: ``start_server`` and ``start_client`` processes; the relay sits between them."""
    port = free_port()
    out = work / f"flower-{'relay' if relay else 'direct'}.json"
    side = [str(python), str(BENCH / "_flower_side.py")]
    children = Children(work, flower_env(python, work / "flwr-home"))
    counter: CountingRelay | None = None
    try:
        server = children.spawn([*side, "server", "--port", str(port), "--rounds", str(rounds), "--clients",
                                 str(clients), "--weights", str(weights), "--out", str(out)], "flower-server")
        wait_port(port, server, "the Flower server")
        if relay:
            counter = CountingRelay(port)
        target = counter.port if counter else port
        for i in range(clients):
            children.spawn([*side, "client", "--server", f"127.0.0.1:{target}", "--weights", str(weights)],
                           f"flower-client{i}")
        try:
            server.wait(timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise Skip("the Flower server did not finish its rounds within 600 s") from exc
        if server.returncode != 0 or not out.exists():
            raise Skip(f"the Flower server failed (exit {server.returncode}): {children.tail('flower-server')}")
        return counted(json.loads(out.read_text()), counter)
    finally:
        if counter is not None:
            counter.close()
        children.close()


APP_TOML = """[project]
name = "bench-flower"
version = "1.0.0"

[tool.flwr.app]
publisher = "raffm"

[tool.flwr.app.components]
serverapp = "_flower_app:server_app"
clientapp = "_flower_app:client_app"

[tool.flwr.app.config]
weights = ""
out = ""
clients = 2
rounds = 1
"""


def run_superlink(python: Path, weights: Path, clients: int, rounds: int, *, relay: bool,
                  work: Path) -> dict[str, Any]:
    """Deployment runtime: ``flower-superlink``, one ``flower-supernode`` per client, the app started by ``flwr run``.

    The relay sits between the SuperNodes and the SuperLink only; ``flwr run`` and the ServerApp reach the SuperLink
    directly (in 1.42 its Fleet, Control and Runtime APIs share one HTTP port).
    """
    name = f"superlink-{'relay' if relay else 'direct'}"
    port = free_port()
    out = work / f"{name}.json"
    app = work / f"{name}-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_TOML)
    shutil.copy(BENCH / "_flower_app.py", app)
    home = work / f"{name}-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    bin_ = python.parent
    children = Children(work, flower_env(python, home))
    counter: CountingRelay | None = None
    try:
        link = children.spawn([str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                               "--disable-runtime-dependency-installation"], name)
        wait_port(port, link, "flower-superlink")
        if relay:
            counter = CountingRelay(port)
        target = counter.port if counter else port
        for i in range(clients):
            children.spawn([str(bin_ / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{target}",
                            "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", f"index={i}"],
                           f"{name}-node{i}")
        config = f'weights="{weights}" out="{out}" clients={clients} rounds={rounds}'
        try:
            started = subprocess.run([str(bin_ / "flwr"), "run", str(app), "bench", "--run-config", config],
                                     capture_output=True, text=True, env=children.env, timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise Skip("flwr run did not start the run within 120 s") from exc
        if started.returncode != 0:
            raise Skip(f"flwr run failed (exit {started.returncode}): {(started.stderr or started.stdout)[-600:]}")
        end = time.monotonic() + 600
        while not out.exists():
            if link.poll() is not None or time.monotonic() > end:
                raise Skip(f"the ServerApp did not finish its rounds (SuperLink exit {link.returncode}): "
                           f"{children.tail(name)}")
            time.sleep(0.2)
        return counted(json.loads(out.read_text()), counter)
    finally:
        if counter is not None:
            counter.close()
        children.close()


# -- ours --------------------------------------------------------------------------------------------------------------


def run_ours(model: Any, clients: int, rounds: int, *, relay: bool, reorder: bool, work: Path) -> dict[str, Any]:
    import grpc
    import torch

    from edge_agent.client import aggregator_stub, extractor_stub
    from edge_agent.transfer import download_once, upload_once
    from raffm.reassembly import MemorySink
    from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc
    from raffm.wire import WirePayload
    from services.aggregator.app import AggregatorConfig, build_aggregator
    from services.aggregator.config import JobConfig
    from services.common.auth import auth_metadata, fleet_verifier
    from services.common.server import ServerConfig
    from services.common.testing import LoopThread
    from services.extractor.app import ExtractorConfig, build_extractor
    from services.registry.testing import OPERATOR_TOKEN, RegistryHarness

    root = work / f"ours-{'relay' if relay else 'direct'}"
    root.mkdir()
    secret = "bench-ticket-secret-0123456789"
    state = float_state(model)
    config = model.config.to_dict()
    config["model_type"] = model.config.model_type

    def initial() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {n: t.clone() for n, t in state.items()}, config

    options = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    job = JobConfig(job_id="benchflower", model="synthetic", rounds=rounds, clients_per_round=clients, quorum=clients,
                    wire_dtype="float32", strategy="fedavg", ordering="every_round" if reorder else "never",
                    round_deadline_s=3600, poll_wait_s=0.02,
                    poll_jitter=0.0, evaluate=False)
    registry = RegistryHarness(f"sqlite:///{root / 'registry.db'}").start()
    loop = LoopThread()

    async def start() -> tuple[Any, Any]:
        verifier = fleet_verifier(registry.address, OPERATOR_TOKEN)
        ext = await build_extractor(ExtractorConfig(f"file://{root / 'agg' / 'checkpoints'}", secret),
                                    verifier=verifier)
        await ext.server.start()
        agg = await build_aggregator(AggregatorConfig(job=job, data_dir=str(root / "agg"), ticket_secret=secret,
                                                      registry_target=registry.address, operator_token=OPERATOR_TOKEN,
                                                      tick_s=0.01, server=ServerConfig(grace_s=1.0)),
                                     verifier=verifier, initial_model=initial)
        await agg.server.start()
        return ext, agg

    ext, agg = loop.run(start(), timeout=600)
    relays: list[CountingRelay] = []
    try:
        ext_port, agg_port = ext.server.port, agg.server.port
        if relay:
            relays = [CountingRelay(ext_port), CountingRelay(agg_port)]
            ext_port, agg_port = relays[0].port, relays[1].port
        devices = []
        for i in range(clients):
            reply = registry.register(f"bench{i}", train_memory_mb=1 << 20, gflops=1e5, up_mbps=1e5, down_mbps=1e5,
                                      tier="server")
            devices.append((reply.device_id, auth_metadata(reply.token)))
        operator = aggregator_pb2_grpc.AggregatorServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{agg.server.port}", options=options))  # not through the relay
        op_md = auth_metadata(OPERATOR_TOKEN)
        barrier = threading.Barrier(clients + 1)
        round_ids: dict[int, str] = {}
        errors: list[BaseException] = []

        def device(index: int, device_id: str, md: Any) -> None:
            astub = aggregator_stub(grpc.insecure_channel(f"127.0.0.1:{agg_port}", options=options))  # the agent's
            estub = extractor_stub(grpc.insecure_channel(f"127.0.0.1:{ext_port}", options=options))
            try:
                for r in range(rounds):
                    barrier.wait()
                    while True:
                        reply = astub.PollRound(aggregator_pb2.PollRequest(device_id=device_id), metadata=md,
                                                timeout=60)
                        if reply.WhichOneof("action") == "assignment":
                            break
                        time.sleep(0.02)
                    a = reply.assignment
                    round_ids[r] = a.round_id
                    sink = MemorySink()
                    d = download_once(estub, a.ticket, sink, metadata=md)
                    d.reassembler.finish()
                    zero = WirePayload.from_state({n: torch.zeros_like(t) for n, t in sink.tensors.items()}, "float32",
                                                  names=[m.name for m in d.manifest.tensors])
                    ack = upload_once(astub, a.ticket, 1, zero, metadata=md)
                    if not ack.accepted:
                        raise RuntimeError(f"update of device {index} refused: {ack}")
                    barrier.wait()  # the round is closed (the operator saw it) before the next poll
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=device, args=(i, *dev), daemon=True) for i, dev in enumerate(devices)]
        for t in threads:
            t.start()
        seconds: list[float] = []
        for r in range(rounds):
            for rl in relays:
                if r == 0:
                    rl.reset()
            barrier.wait()
            started = time.perf_counter()
            while r not in round_ids and not errors:
                time.sleep(0.005)
            while not errors:
                got = operator.GetRound(aggregator_pb2.GetRoundRequest(round_id=round_ids[r]), metadata=op_md,
                                        timeout=30)
                if got.state == aggregator_pb2.ROUND_STATE_CLOSED:
                    break
                time.sleep(0.005)
            seconds.append(time.perf_counter() - started)
            if errors:
                raise errors[0]
            barrier.wait()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        result: dict[str, Any] = {"round_seconds": seconds}
        if relay:
            time.sleep(0.5)
            result["bytes_up"] = sum(rl.up for rl in relays)
            result["bytes_down"] = sum(rl.down for rl in relays)
        return result
    finally:
        for rl in relays:
            rl.close()
        loop.run(agg.server.stop(1.0))
        loop.run(ext.server.stop(1.0))
        loop.close()
        registry.stop()


# -- main --------------------------------------------------------------------------------------------------------------


FRAMEWORKS = {"flower": "Flower legacy gRPC", "superlink": "Flower SuperLink", "ours": "RaFFM"}


def render(result: dict[str, Any]) -> str:
    parts = {name: result[name] for name in FRAMEWORKS if name in result}
    ran = {name: part for name, part in parts.items() if "skipped" not in part}
    raw_s = result["raw_socket_s"]

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(part) for part in ran.values()) + " |"

    lines = [
        f"{result['model']}: {result['tensor_bytes'] / 1e6:.1f} MB of fp32 tensors; {result['clients']} clients, "
        f"{result['rounds']} rounds, zero local steps; Flower {result.get('flower_version') or '-'}; RaFFM reorder "
        f"{'on' if result['reorder'] else 'off'}; loopback. Raw socket: {result['round_payload_bytes'] / 1e6:.0f} MB "
        f"(2 x clients x tensor bytes) in {raw_s:.3f} s ({result['raw_socket_mb_s']:.0f} MB/s, best of 3).",
        "",
        "| | " + " | ".join(FRAMEWORKS[name] for name in ran) + " |",
        "|---" * (len(ran) + 1) + "|",
        row("framework time per round, median (s)", lambda p: f"{p['median_s']:.3f}"),
        row("rounds (s)", lambda p: ", ".join(f"{x:.3f}" for x in p["round_seconds"])),
        row("x raw-socket time for the round's bytes", lambda p: f"{p['median_s'] / raw_s:.1f}"),
        row("bytes on the wire per round (MB)", lambda p: f"{p['bytes_per_round'] / 1e6:.1f}"),
        row("wire bytes / (2 x clients x tensor bytes)", lambda p: f"{p['overhead']:.4f}"),
    ]
    lines += ["", *(f"{FRAMEWORKS[name]} skipped: {part['skipped']}" for name, part in parts.items()
                    if "skipped" in part)]
    return "\n".join(lines).rstrip()


def measure(run: Callable[[bool], dict[str, Any]], clients: int, rounds: int, tensor_bytes: int) -> dict[str, Any]:
    """One timed pass and one pass through the counting relay (``run(relay)``) of one framework."""
    timed, counted = run(False), run(True)
    per_round = (counted["bytes_up"] + counted["bytes_down"]) / rounds
    return {"round_seconds": timed["round_seconds"], "median_s": statistics.median(timed["round_seconds"]),
            "relay_round_seconds": counted["round_seconds"], "bytes_up": counted["bytes_up"],
            "bytes_down": counted["bytes_down"], "bytes_per_round": per_round,
            "overhead": per_round / (2 * clients * tensor_bytes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small random BERT, 2 clients, 2 rounds")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--reorder", action="store_true", help="RaFFM re-applies SPP to every new version")
    parser.add_argument("--no-install", action="store_true", help="do not create Flower's environment")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    clients = args.clients or (2 if args.quick else 8)
    rounds = args.rounds or (2 if args.quick else 3)

    import numpy as np

    from raffm.report import machine_info

    result: dict[str, Any] = {"bench": "bench_flower", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "machine": machine_info(), "clients": clients, "rounds": rounds,
                              "reorder": args.reorder,
                              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    python: Path | None = None
    no_flower = ""
    try:
        python = flower_python(install=not args.no_install)
        result["flower_version"] = flower_version(python)
    except Skip as exc:
        no_flower = str(exc)
    model, label = build_model(args.quick)
    result["model"] = label
    state = float_state(model)
    tensor_bytes = result["tensor_bytes"] = sum(t.numel() * 4 for t in state.values())
    payload = result["round_payload_bytes"] = 2 * clients * tensor_bytes
    result["raw_socket_mb_s"] = max(raw_socket_mb_s(payload) for _ in range(3))
    result["raw_socket_s"] = payload / (result["raw_socket_mb_s"] * 1e6)
    with tempfile.TemporaryDirectory(prefix="bench_flower_") as tmp:
        work = Path(tmp)
        weights = work / "weights.npz"
        np.savez(weights, **{f"{i:04d}": t.numpy() for i, t in enumerate(state.values())})
        print(f"bench_flower: {label}, {clients} clients, {rounds} rounds; raw socket "
              f"{result['raw_socket_s']:.3f} s per round's bytes", flush=True)

        def run(name: str, relay: bool) -> dict[str, Any]:
            if name == "ours":
                return run_ours(model, clients, rounds, relay=relay, reorder=args.reorder, work=work)
            if python is None:
                raise Skip(no_flower)
            flower = run_flower if name == "flower" else run_superlink
            return flower(python, weights, clients, rounds, relay=relay, work=work)

        for name in FRAMEWORKS:
            try:
                result[name] = measure(functools.partial(run, name), clients, rounds, tensor_bytes)
                print(f"  {name}: rounds {['%.3f' % x for x in result[name]['round_seconds']]} s, "
                      f"{result[name]['bytes_per_round'] / 1e6:.1f} MB per round", flush=True)
            except Skip as exc:
                result[name] = {"skipped": str(exc)}
                print(f"  {name}: skipped: {exc}", flush=True)
    text = render(result)
    print()
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
