"""Closed-loop sizing on a lying fleet: calibration on against off, same fleet, same job, a table per round.

The real registry, extractor and aggregator run in this process (real gRPC on 127.0.0.1, real SQLite); the devices
are real edge agents, one process each (`python -m edge_agent run`, as `raffm agent simulate` starts them), training
a tiny BERT on their own toy reviews. Every device declares the same profile; what they really have differs
(`--true-gflops`, `--true-up-mbps`, `--true-down-mbps`, the agent throttles itself):

- laptop: honest;
- phone: declares 3x the compute it has;
- jetson: declares 3x the bandwidth it has (up and down);
- server: declares a third of the compute it has.

The declared speed puts an honest device in the middle of the ladder, so over-declarers miss the deadline unless
their slices shrink, and under-declarers have room to grow. Reported per round and mode: assignments, updates accepted
before the deadline (the hit rate), the median |measured / predicted - 1| of round time (assignment to accepted upload
against the plan's estimate), the largest measured peak memory over the declared budget, accepted update MB, and the
mean share of the encoder (heads and FFN neurons) each group trained.

    .venv/bin/python bench/bench_calibration.py [--rounds 5] [--deadline-s 40] [--json out.json]

Both modes run on the same agent processes, calibration off first: the agents' one-time costs (tokenizer, warm-up,
the frozen embeddings' download) fall in the first mode's round 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# group (= the device's tier label) -> (true compute, true link) over what it declares
GROUPS = {"laptop": (1.0, 1.0), "phone": (1 / 3, 1.0), "jetson": (1.0, 1 / 3), "server": (3.0, 1.0)}
SAMPLES = 80  # per device: 10 steps of 8 in epoch mode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_model(root: Path) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from raffm.models import default_model_path

    import torch

    torch.manual_seed(0)
    path = root / "tiny-bert"
    shape: dict[str, Any] = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                 intermediate_size=256, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(BertConfig(**shape)).save_pretrained(path)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(path)
    return path


def declared_gflops(job: Any, config: Any, deadline_s: float, load: float) -> tuple[float, list[float]]:
    """The declared GFLOP/s at which the full model's compute takes ``load`` deadlines (above 1, an honest device
    trains a middle rung), and each rung's share of the full model's trained (encoder) parameters."""
    from raffm.fitting import ladder
    from raffm.planning import cost_model_for

    cm = cost_model_for(config)
    strategy = job.method()
    rungs = ladder(cm.dims)
    full = rungs[-1]
    recipe = strategy.recipes_for(full, cm)[0]
    costs = cm.estimate(full, batch_size=job.batch_size, seq_len=job.seq_len, wire_dtype=job.wire_dtype,
                        recipe=recipe)
    return SAMPLES * costs.flops_per_sample / 1e9 / (deadline_s * load), [encoder_share(s) for s in rungs]


def encoder_share(spec: Any) -> float:
    """The share of the full encoder's attention heads and FFN neurons a spec keeps (the vocabulary embeddings, frozen
    and the same in every slice, would make every spec look like the whole model)."""
    return sum(layer.heads * layer.head_dim + layer.ffn for layer in spec.layers) / FULL_UNITS


FULL_UNITS = 2 * (8 * 8 + 256)  # the bench model: 2 layers of 8 heads of 8 dims and 256 FFN neurons


def write_data(path: Path, seed: int) -> Path:
    words = ["a wonderful, moving film", "dull and far too long", "great acting", "a mess of a script",
             "the best of the year", "i walked out", "charming and warm", "painfully slow"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(SAMPLES):
            j = (i * 5 + seed) % len(words)
            f.write(json.dumps({"text": f"{words[j]} #{i}", "label": int(j % 2 == 0)}) + "\n")
    return path


def run_fleet(root: Path, model: Path, *, modes: list[bool], rounds: int, deadline_s: float, devices: int,
              load: float, log: Any) -> list[dict[str, Any]]:
    """One registry, extractor and fleet of agent processes; one job per mode (calibration off, on), each on a fresh
    aggregator at the same address, so both modes see the same devices."""
    import grpc
    from prometheus_client import CollectorRegistry
    from transformers import AutoConfig

    from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc, registry_pb2
    from services.aggregator.app import AggregatorConfig, build_aggregator
    from services.aggregator.config import JobConfig
    from services.common.auth import auth_metadata, fleet_verifier
    from services.common.server import ServerConfig
    from services.common.testing import LoopThread
    from services.extractor.app import ExtractorConfig, build_extractor
    from services.registry.testing import ENROLL_KEY, OPERATOR_TOKEN, RegistryHarness

    secret = "bench-ticket-secret-0123456789"

    def job_for(calibrate: bool) -> JobConfig:
        return JobConfig(job_id="calib-on" if calibrate else "calib-off", model=str(model), num_labels=2,
                         rounds=rounds, clients_per_round=devices, quorum=devices, min_updates=1,
                         round_deadline_s=deadline_s, batch_size=8, seq_len=16, local_steps=0, local_epochs=1,
                         poll_wait_s=0.5, evaluate=False, calibrate=calibrate,
                         ticket_grace_s=10 * deadline_s)  # late uploads still reach the aggregator and report

    registry = RegistryHarness(f"sqlite:///{root / 'registry.db'}").start()
    loop = LoopThread()
    agg_port = free_port()
    store_url = f"file://{root / 'checkpoints'}"

    async def start_extractor() -> Any:
        verifier = fleet_verifier(registry.address, OPERATOR_TOKEN)  # its channel belongs to the service's loop
        ext = await build_extractor(ExtractorConfig(store_url, secret), verifier=verifier,
                                    registry=CollectorRegistry())
        await ext.server.start()
        return ext

    async def start_aggregator(job: JobConfig) -> Any:
        verifier = fleet_verifier(registry.address, OPERATOR_TOKEN)
        agg = await build_aggregator(AggregatorConfig(job=job, data_dir=str(root / job.job_id), ticket_secret=secret,
                                                      store_url=store_url, registry_target=registry.address,
                                                      operator_token=OPERATOR_TOKEN, extractor_target=ext.address,
                                                      tick_s=0.1, server=ServerConfig(port=agg_port, grace_s=1.0)),
                                     verifier=verifier, registry=CollectorRegistry())
        await agg.server.start()
        return agg

    ext = loop.run(start_extractor(), timeout=600)
    config = AutoConfig.from_pretrained(model)
    gflops, shares = declared_gflops(job_for(True), config, deadline_s, load)
    procs: list[subprocess.Popen[bytes]] = []
    results = []
    try:
        up, down, memory = 2.0, 20.0, 2000
        groups = list(GROUPS)
        for i in range(devices):
            group = groups[i % len(groups)]
            compute, link = GROUPS[group]
            name = f"{group}-{i}"
            cmd = [sys.executable, "-m", "edge_agent", "run", "--registry", registry.address, "--aggregator",
                   f"127.0.0.1:{agg_port}", "--extractor", ext.address, "--name", name, "--state-dir",
                   str(root / "agents" / name), "--data", str(write_data(root / f"data-{i}.jsonl", i)), "--model",
                   str(model), "--tier", group, "--memory-mb", str(memory), "--gflops", f"{gflops:.6g}",
                   "--up-mbps", str(up), "--down-mbps", str(down), "--true-gflops", f"{gflops * compute:.6g}",
                   "--true-up-mbps", f"{up * link:.6g}", "--true-down-mbps", f"{down * link:.6g}", "--threads", "1",
                   "--progress", "off", "--log-format", "json", "--backoff-max-s", "2"]
            out = (root / f"agent-{name}.log").open("wb")
            procs.append(subprocess.Popen(cmd, env=dict(os.environ, RAFFM_AGENT_ENROLL_KEY=ENROLL_KEY), stdout=out,
                                          stderr=subprocess.STDOUT))
        # A job (and its first round's deadline) starts once the whole fleet has registered and is polling.
        ready = time.monotonic() + 900
        while len(registry.stub.ListDevices(registry_pb2.ListDevicesRequest(page_size=1000),
                                            metadata=registry.operator, timeout=10).devices) < devices:
            if time.monotonic() > ready:
                raise RuntimeError(f"the fleet did not register within 900 s; see the agent logs in {root}")
            time.sleep(1.0)
        time.sleep(3.0)
        for calibrate in modes:
            job = job_for(calibrate)
            t0 = time.monotonic()
            agg = loop.run(start_aggregator(job), timeout=600)
            try:
                stub = aggregator_pb2_grpc.AggregatorServiceStub(grpc.insecure_channel(agg.address))
                md = auth_metadata(OPERATOR_TOKEN)
                end = time.monotonic() + rounds * deadline_s * 5 + 600
                while time.monotonic() < end:
                    j = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=md, timeout=10)
                    if j.state in (aggregator_pb2.JOB_STATE_COMPLETED, aggregator_pb2.JOB_STATE_FAILED):
                        break
                    time.sleep(1.0)
                else:
                    print(f"# {job.job_id}: gave up waiting for the job to finish", file=log)
            finally:
                loop.run(agg.server.stop(1.0))
            res = collect(root / job.job_id / "aggregator.db", job.job_id)
            res.update(calibrate=calibrate, declared_gflops=gflops, rung_shares=shares, wall_s=time.monotonic() - t0)
            results.append(res)
            print_table([res], out=log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        loop.run(ext.server.stop(1.0))
        loop.close()
        registry.stop()
    return results


def collect(db: Path, job_id: str) -> dict[str, Any]:
    """Per round: assignments, accepted (on time), round-time error, peak memory over budget, bytes, spec shares."""
    from raffm.spec import ElasticSpec
    from services.aggregator.reports import predicted_round_seconds
    from services.aggregator.store import SqlRoundStore

    store = SqlRoundStore(f"sqlite:///{db}")
    rows = []
    try:
        for rnd in store.list_rounds(job_id):
            assigned = store.assignments(rnd.round_id)
            done = [a for a in assigned if a.state == "uploaded"]
            reported = [a for a in assigned if a.report]
            errors = [abs(a.report["round_seconds"] / predicted_round_seconds(a) - 1) for a in done
                      if predicted_round_seconds(a) > 0]
            peaks = [a.report.get("peak_memory_mb", 0) / a.predicted["declared_memory_mb"] for a in reported
                     if a.predicted.get("declared_memory_mb")]
            share = {g: [encoder_share(ElasticSpec.from_dict(a.spec)) for a in assigned if a.tier == g]
                     for g in GROUPS}
            rows.append({
                "round": rnd.index, "assigned": len(assigned), "accepted": len(done),
                "hit_rate": len(done) / len(assigned) if assigned else 0.0,
                "median_round_time_error": statistics.median(errors) if errors else math.nan,
                "max_peak_over_budget": max(peaks) if peaks else math.nan,
                "accepted_mb": rnd.bytes_up / 1e6,
                "share": {g: statistics.mean(v) if v else math.nan for g, v in share.items()},
            })
    finally:
        store.close()
    return {"rounds": rows}


def print_table(results: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    groups = " | ".join(f"{g} share" for g in GROUPS)
    print(f"| calibration | round | assigned | on time | hit rate | median round-time error | max peak / budget | "
          f"accepted MB | {groups} |", file=out)
    print("|---" * (8 + len(GROUPS)) + "|", file=out)
    for res in results:
        mode = "on" if res["calibrate"] else "off"
        for r in res["rounds"]:
            shares = " | ".join("-" if math.isnan(v) else f"{v:.2f}" for v in r["share"].values())
            err = "-" if math.isnan(r["median_round_time_error"]) else f"{100 * r['median_round_time_error']:.0f}%"
            peak = "-" if math.isnan(r["max_peak_over_budget"]) else f"{r['max_peak_over_budget']:.2f}"
            print(f"| {mode} | {r['round']} | {r['assigned']} | {r['accepted']} | {100 * r['hit_rate']:.0f}% | {err} "
                  f"| {peak} | {r['accepted_mb']:.2f} | {shares} |", file=out)
    for res in results:
        mode = "on" if res["calibrate"] else "off"
        later = [r for r in res["rounds"] if r["round"] >= 3]
        hit = sum(r["accepted"] for r in later) / max(1, sum(r["assigned"] for r in later))
        errs = [r["median_round_time_error"] for r in later if not math.isnan(r["median_round_time_error"])]
        mb = sum(r["accepted_mb"] for r in res["rounds"]) / max(1, len(res["rounds"]))
        print(f"\ncalibration {mode}: rounds >= 3 hit rate {100 * hit:.0f}%, median round-time error "
              f"{100 * statistics.median(errs) if errs else math.nan:.0f}%, accepted MB per round {mb:.2f}", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--deadline-s", type=float, default=40.0)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--load", type=float, default=2.0,
                   help="the full model's compute at the declared speed, in deadlines (default: %(default)s)")
    p.add_argument("--only", choices=("on", "off"), help="run one mode only")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--keep", help="keep the work directory here (agent logs, databases)")
    args = p.parse_args(argv)
    if args.devices < 8:
        p.error("--devices: the lying fleet needs at least 8 devices")
    modes = [m for m in (False, True) if not args.only or args.only == ("on" if m else "off")]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        model = tiny_model(base)
        results = run_fleet(base, model, modes=modes, rounds=args.rounds, deadline_s=args.deadline_s,
                            devices=args.devices, load=args.load, log=sys.stderr)
    print(f"# bench_calibration: {args.devices} devices ({', '.join(GROUPS)}; true/declared compute, link: "
          f"{', '.join(f'{g} {c:.2g}, {l:.2g}' for g, (c, l) in GROUPS.items())}), {args.rounds} rounds of "
          f"{args.deadline_s:g} s, declared {results[0]['declared_gflops']:.3g} GFLOP/s (the full model's compute = "
          f"{args.load:g} deadlines); {os.cpu_count()} CPUs")
    print(f"# ladder (share of the encoder's heads and FFN neurons): "
          f"{', '.join(f'{s:.2f}' for s in results[0]['rung_shares'])}")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
