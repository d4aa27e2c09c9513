"""A FedAvg round through Flower's transport and through ours, on loopback: bytes on the wire and framework time.

The same model (MiniLM with a 2-label head, fp32; ``--quick``: a small random BERT), the same number of clients, the
same rounds, and clients that train for **zero** steps (Flower's client returns the received parameters, ours
uploads a zero delta), so what remains of a round is serialization, transport both ways and aggregation.

- Flower 1.42, legacy gRPC transport (``start_server`` / ``start_client``; deprecated since 1.13 in favour of the
  SuperLink/SuperNode deployment engine, which adds a hop) in its own virtual environment (``bench/flower_env.sh``;
  Flower's side needs numpy only). Server and clients are separate processes. Round time: from the end of client
  sampling to the end of ``FedAvg.aggregate_fit`` (measured in the server by a strategy subclass).
- RaFFM: registry, extractor and aggregator in this process on 127.0.0.1 (real SQLite, a checkpoint directory,
  durable staging with fsync), clients as threads with sync gRPC stubs: PollRound, DownloadSlice (full spec),
  UploadUpdate (zero delta). Round time: from releasing the clients to the round's state becoming CLOSED (the new
  model version committed). Salience reordering of the new version is off unless ``--reorder`` (FedAvg has none).

Bytes: a second pass of every framework runs through a byte-counting TCP relay on 127.0.0.1 (the same relay class
for both), counting both directions of every client connection; registration traffic of ours is excluded (it
happens once per device, before the rounds). Reported per round and against the model's tensor bytes.

    .venv/bin/python bench/bench_flower.py [--clients 8 --rounds 3] [--quick] [--json out.json]

If Flower's environment cannot be created or Flower cannot run, the bench prints ``skipped: <why>`` and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_transfer import CountingRelay  # noqa: E402

from raffm_app.processes import free_port  # noqa: E402

FLOWER_VENV = BENCH / ".flower" / ".venv"
MiB = 1 << 20


class Skip(Exception):
    """Flower cannot be benchmarked here; the message says why."""


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise Skip(f"the Flower server exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise Skip(f"the Flower server did not listen on port {port} within {timeout:.0f} s")


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
                            intermediate_size=512, num_labels=2)
        return BertForSequenceClassification(config).eval(), "random BERT hidden 128, 2 layers, vocab 8000"
    from raffm.models import load_global_model

    return load_global_model(), "MiniLM-L6 (all-MiniLM-L6-v2) + 2-label head"


def float_state(model: Any) -> dict[str, Any]:
    return {n: t.detach().float().contiguous() for n, t in model.state_dict().items() if t.is_floating_point()}


# -- Flower ------------------------------------------------------------------------------------------------------------


def run_flower(python: Path, weights: Path, clients: int, rounds: int, *, relay: bool, work: Path) -> dict[str, Any]:
    port = free_port()
    out = work / f"flower-{'relay' if relay else 'direct'}.json"
    side = str(BENCH / "_flower_side.py")
    logs: list[Any] = []
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (work / f"{name}.log").open("wb")
        logs.append(log)
        p = subprocess.Popen([str(python), side, *args], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        procs.append(p)
        return p

    counter: CountingRelay | None = None
    try:
        server = spawn(["server", "--port", str(port), "--rounds", str(rounds), "--clients", str(clients),
                        "--weights", str(weights), "--out", str(out)], "flower-server")
        wait_port(port, server)
        target = port
        if relay:
            counter = CountingRelay(port)
            target = counter.port
        for i in range(clients):
            spawn(["client", "--server", f"127.0.0.1:{target}", "--weights", str(weights)], f"flower-client{i}")
        try:
            server.wait(timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise Skip("the Flower server did not finish its rounds within 600 s") from exc
        if server.returncode != 0 or not out.exists():
            tail = (work / "flower-server.log").read_text(errors="replace")[-600:]
            raise Skip(f"the Flower server failed (exit {server.returncode}): {tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        if relay and counter is not None:
            time.sleep(0.5)  # let the relay pumps drain
            result["bytes_up"], result["bytes_down"] = counter.up, counter.down
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
        if counter is not None:
            counter.close()


# -- ours --------------------------------------------------------------------------------------------------------------


def run_ours(model: Any, clients: int, rounds: int, *, relay: bool, reorder: bool, work: Path) -> dict[str, Any]:
    import grpc
    import torch

    from edge_agent.transfer import download_once, upload_once
    from raffm.reassembly import MemorySink
    from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc, extractor_pb2_grpc
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
            astub = aggregator_pb2_grpc.AggregatorServiceStub(
                grpc.insecure_channel(f"127.0.0.1:{agg_port}", options=options))
            estub = extractor_pb2_grpc.ExtractorServiceStub(
                grpc.insecure_channel(f"127.0.0.1:{ext_port}", options=options))
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


def render(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    f, o = result["flower"], result["ours"]
    mb = result["tensor_bytes"] / 1e6
    lines = [
        f"{result['model']}: {mb:.1f} MB of fp32 tensors; {result['clients']} clients, {result['rounds']} rounds, "
        f"zero local steps; Flower {result['flower_version']} (legacy gRPC transport) vs RaFFM services "
        f"(reorder {'on' if result['reorder'] else 'off'}); loopback.",
        "",
        "| | Flower | RaFFM | RaFFM / Flower |",
        "|---|---|---|---|",
        f"| framework time per round, median (s) | {f['median_s']:.3f} | {o['median_s']:.3f} | "
        f"{o['median_s'] / f['median_s']:.2f} |",
        f"| rounds (s) | {', '.join(f'{x:.3f}' for x in f['round_seconds'])} | "
        f"{', '.join(f'{x:.3f}' for x in o['round_seconds'])} | |",
        f"| bytes on the wire per round (MB) | {f['bytes_per_round'] / 1e6:.1f} | {o['bytes_per_round'] / 1e6:.1f} | "
        f"{o['bytes_per_round'] / f['bytes_per_round']:.3f} |",
        f"| wire bytes / (2 x clients x tensor bytes) | {f['overhead']:.4f} | {o['overhead']:.4f} | |",
    ]
    return "\n".join(lines)


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

    from raffm.report import machine_info

    result: dict[str, Any] = {"bench": "bench_flower", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                              "machine": machine_info(), "clients": clients, "rounds": rounds,
                              "reorder": args.reorder,
                              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    try:
        python = flower_python(install=not args.no_install)
        result["flower_version"] = flower_version(python)
        import numpy as np

        model, label = build_model(args.quick)
        result["model"] = label
        state = float_state(model)
        result["tensor_bytes"] = sum(t.numel() * 4 for t in state.values())
        with tempfile.TemporaryDirectory(prefix="bench_flower_") as tmp:
            work = Path(tmp)
            weights = work / "weights.npz"
            np.savez(weights, **{f"{i:04d}": t.numpy() for i, t in enumerate(state.values())})
            print(f"bench_flower: {label}, {clients} clients, {rounds} rounds", flush=True)
            parts: dict[str, dict[str, Any]] = {}
            for name in ("flower", "ours"):
                if name == "flower":
                    timed = run_flower(python, weights, clients, rounds, relay=False, work=work)
                    counted = run_flower(python, weights, clients, rounds, relay=True, work=work)
                else:
                    timed = run_ours(model, clients, rounds, relay=False, reorder=args.reorder, work=work)
                    counted = run_ours(model, clients, rounds, relay=True, reorder=args.reorder, work=work)
                per_round = (counted["bytes_up"] + counted["bytes_down"]) / rounds
                parts[name] = {
                    "round_seconds": timed["round_seconds"],
                    "median_s": statistics.median(timed["round_seconds"]),
                    "relay_round_seconds": counted["round_seconds"],
                    "bytes_up": counted["bytes_up"], "bytes_down": counted["bytes_down"],
                    "bytes_per_round": per_round,
                    "overhead": per_round / (2 * clients * result["tensor_bytes"]),
                }
                print(f"  {name}: rounds {['%.3f' % x for x in timed['round_seconds']]} s, "
                      f"{per_round / 1e6:.1f} MB per round", flush=True)
            result.update(parts)
            result["time_ratio_ours_over_flower"] = parts["ours"]["median_s"] / parts["flower"]["median_s"]
            result["bytes_ratio_ours_over_flower"] = parts["ours"]["bytes_per_round"] / parts["flower"]["bytes_per_round"]
    except Skip as exc:
        result["skipped"] = str(exc)
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
