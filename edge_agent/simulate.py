"""`raffm agent simulate`: many agents on one machine, each with its own profile and its own non-IID data share.

Devices are spread over the tiers of a TOML file in proportion to each tier's ``share``; the data set is split over
the devices with a Dirichlet(alpha) label split (seeded, so a run is reproducible). Agents run as separate processes
(the default: real isolation, real per-process memory measurements), as threads in this process (cheap; for
tests), or as Ray actors over a cluster (:mod:`edge_agent.fleet`, which also has the control-plane mode that fits a
thousand devices on one machine). Each agent gets its own state directory under ``--state-root``, so a re-run keeps
every device's identity. SIGTERM, SIGINT and SIGHUP stop every agent (they finish their training step and report the
abandoned round); agent processes also stop by themselves when this process dies, and this one when the process that
started it dies (:mod:`raffm.lifeline`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_agent.config import AgentConfig
from raffm.data import LABEL_COLUMN_HELP, TEXT_COLUMN_HELP
from raffm.profile import TIERS

log = logging.getLogger("edge_agent.simulate")


@dataclass(frozen=True)
class Tier:
    name: str
    memory_mb: int
    gflops: float
    up_mbps: float
    down_mbps: float
    share: float = 1.0
    tier: str = "laptop"  # the registry's device class (metrics label)
    # what the devices really have when it differs from what they declare (0: as declared): a lying fleet
    true_gflops: float = 0.0
    true_up_mbps: float = 0.0
    true_down_mbps: float = 0.0


def load_tiers(path: str | Path) -> list[Tier]:
    """Tiers from TOML: ``[tiers.NAME]`` tables with memory_mb, gflops, up_mbps, down_mbps, optional share/tier, and
    optional true_gflops/true_up_mbps/true_down_mbps: the devices' real speed and links when they differ from the
    declared ones (the agents throttle themselves to them)."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--tiers: no such file {str(p)!r}")
    raw = tomllib.loads(p.read_text(encoding="utf-8"))
    tables = raw.get("tiers", raw)
    if not isinstance(tables, dict) or not tables:
        raise ValueError(f"{p}: expected [tiers.NAME] tables")
    out = []
    for name, t in tables.items():
        if not isinstance(t, dict):
            raise ValueError(f"{p}: tier {name!r} must be a table")
        missing = [k for k in ("memory_mb", "gflops", "up_mbps", "down_mbps") if k not in t]
        if missing:
            raise ValueError(f"{p}: tier {name!r} lacks {', '.join(missing)}")
        tier = Tier(name=name, memory_mb=int(t["memory_mb"]), gflops=float(t["gflops"]), up_mbps=float(t["up_mbps"]),
                    down_mbps=float(t["down_mbps"]), share=float(t.get("share", 1.0)),
                    tier=str(t.get("tier", name if name in TIERS else "laptop")),
                    true_gflops=float(t.get("true_gflops", 0.0)), true_up_mbps=float(t.get("true_up_mbps", 0.0)),
                    true_down_mbps=float(t.get("true_down_mbps", 0.0)))
        if min(tier.true_gflops, tier.true_up_mbps, tier.true_down_mbps) < 0:
            raise ValueError(f"{p}: tier {name!r} needs true_gflops, true_up_mbps and true_down_mbps >= 0 (0: as "
                             "declared)")
        if tier.share <= 0 or tier.memory_mb <= 0 or tier.gflops <= 0 or tier.up_mbps <= 0 or tier.down_mbps <= 0:
            raise ValueError(f"{p}: tier {name!r} needs positive memory_mb, gflops, up_mbps, down_mbps and share")
        if tier.tier not in TIERS:
            raise ValueError(f"{p}: tier {name!r} has device class {tier.tier!r}; use one of {', '.join(TIERS)}")
        out.append(tier)
    return out


def tiers_toml(tiers: list[Tier]) -> str:
    """The TOML text :func:`load_tiers` reads back as ``tiers``."""
    lines = []
    for t in tiers:
        lines.append(f"[tiers.{t.name}]")
        lines += [f"{k} = {v:g}" for k, v in (("memory_mb", t.memory_mb), ("gflops", t.gflops), ("up_mbps", t.up_mbps),
                                               ("down_mbps", t.down_mbps), ("share", t.share))]
        lines += [f"{k} = {v:g}" for k, v in (("true_gflops", t.true_gflops), ("true_up_mbps", t.true_up_mbps),
                                               ("true_down_mbps", t.true_down_mbps)) if v]
        lines += [f'tier = "{t.tier}"', ""]
    return "\n".join(lines)


def spread(tiers: list[Tier], devices: int) -> list[Tier]:
    """Device i's tier: counts proportional to shares (largest remainder), interleaved so every prefix is mixed."""
    total = sum(t.share for t in tiers)
    exact = [devices * t.share / total for t in tiers]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(tiers)), key=lambda i: exact[i] - counts[i], reverse=True)[: devices - sum(counts)]:
        counts[i] += 1
    out: list[Tier] = []
    while len(out) < devices:
        for i, t in enumerate(tiers):
            if counts[i]:
                out.append(t)
                counts[i] -= 1
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AgentConfig(name="x")
    parser.add_argument("--devices", type=int, required=True, help="number of simulated devices")
    parser.add_argument("--tiers", required=True, metavar="TOML", help="resource tiers file (see below)")
    parser.add_argument("--data", metavar="PATH",
                        help="data set to split: CSV/TSV/JSON/Parquet file, image array file or folder, "
                             "rotten_tomatoes or mnist (required unless --control-plane)")
    parser.add_argument("--text-column", default=d.text_column, help=TEXT_COLUMN_HELP)
    parser.add_argument("--label-column", default=d.label_column, help=LABEL_COLUMN_HELP)
    parser.add_argument("--task", choices=("auto", "sequence-classification", "image-classification", "causal-lm"),
                        default="auto", help="how to read --data: auto (the default) reads a CSV/JSON file of "
                                             "{prompt, response} records as causal-LM pairs, anything else as the "
                                             "agent does for a classification job")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet concentration of the label split: small = very non-IID (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split (default: %(default)s)")
    parser.add_argument("--max-examples", type=int, default=0,
                        help="use only this many examples of --data before splitting (0: all)")
    parser.add_argument("--mode", choices=("processes", "threads", "ray"), default="processes",
                        help="one process per agent (isolated, realistic memory figures), threads in this "
                             "process, or Ray actors spread over a cluster, each running its share of agents as "
                             "threads (default: %(default)s)")
    parser.add_argument("--state-root", default="runs/simulate", metavar="DIR",
                        help="parent of every device's state directory (default: %(default)s)")
    parser.add_argument("--name-prefix", default="sim", help="devices are named PREFIX-TIER-I (default: %(default)s)")
    parser.add_argument("--registry", default=d.registry, help="registry address (default: %(default)s)")
    parser.add_argument("--aggregator", default=d.aggregator, help="aggregator address (default: %(default)s)")
    parser.add_argument("--extractor", default=d.extractor, help="extractor address (default: %(default)s)")
    parser.add_argument("--enroll-key", default=os.environ.get("RAFFM_AGENT_ENROLL_KEY", ""),
                        help="fleet enrollment key (default: $RAFFM_AGENT_ENROLL_KEY)")
    parser.add_argument("--model", default=d.model, help="tokenizer / fallback config source (default: %(default)s)")
    parser.add_argument("--max-rounds", type=int, default=0,
                        help="each agent exits after this many assignments (0: run until stopped)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per agent (default: %(default)s)")
    parser.add_argument("--log-format", choices=("auto", "text", "json"), default="auto",
                        help="agent log format (default: %(default)s)")
    g = parser.add_argument_group("large fleets (threads and ray modes)")
    g.add_argument("--control-plane", action="store_true",
                   help="a tiny synthetic data share per device and one torch thread, no data set needed: with a "
                        "job on a tiny model and 0-1 local steps, a thousand devices fit on one machine")
    g.add_argument("--duration-s", type=float, default=0.0,
                   help="stop every agent after this many seconds (0: when each finished --max-rounds)")
    g.add_argument("--start-spread-s", type=float, default=0.0,
                   help="start the agents evenly over this many seconds instead of all at once")
    g.add_argument("--ray-address", default="",
                   help="Ray cluster to join (ray://host:10001 or auto); default: start a local Ray instance")
    g.add_argument("--ray-actors", type=int, default=0,
                   help="Ray actors the devices are split over (default: one per CPU of the cluster)")
    g.add_argument("--stats-json", metavar="PATH",
                   help="write registrations, outcomes and per-call latency percentiles here (JSON)")


MAX_ANSWER_CLASSES = 64  # prompt -> response pairs with at most this many distinct responses split like labels


def split_keys(data: Any) -> list[int]:
    """What the Dirichlet split skews: the labels; for prompt -> response pairs, the response when there are few
    distinct ones (a classification posed as generation, like the sentiment instructions: its answers are its
    labels), else nothing (one key for all: the shares differ in size only)."""
    from raffm.generative import InstructionDataset

    if not isinstance(data, InstructionDataset):
        return list(data.labels)
    answers = sorted(set(data.responses))
    if len(answers) > MAX_ANSWER_CLASSES:
        return [0] * len(data)
    index = {a: i for i, a in enumerate(answers)}
    return [index[r] for r in data.responses]


def split_data(data: Any, devices: int, alpha: float, seed: int) -> list[Any]:
    from raffm.data import dirichlet_split

    return [data.subset(idx) for idx in dirichlet_split(split_keys(data), devices, alpha, seed)]


def sniff_task(spec: str) -> str:
    """``causal-lm`` for a CSV/JSON file whose first record has ``prompt`` and ``response``, else
    ``sequence-classification`` (the agent's loader tells text from image data itself)."""
    from raffm.generative import is_pairs_file

    return "causal-lm" if is_pairs_file(spec) else "sequence-classification"


def write_share(share: Any, path: Path, *, labels: bool = True) -> Path:
    """A device's share as a file its agent process can load (JSON lines for text and prompt -> response pairs,
    .pt for images); ``labels`` False leaves a text share's labels out."""
    from raffm.data import ImageDataset, save_image_file
    from raffm.generative import InstructionDataset

    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(share, ImageDataset):
        return save_image_file(share, path.with_suffix(".pt"))
    out = path.with_suffix(".jsonl")
    with out.open("w", encoding="utf-8") as f:
        if isinstance(share, InstructionDataset):
            for prompt, response in zip(share.prompts, share.responses):
                f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        else:
            for i, (text, label) in enumerate(zip(share.texts, share.labels)):
                row = {"text": text} | ({} if share.pairs is None else {"text_pair": share.pairs[i]})
                f.write(json.dumps(row | ({"label": label} if labels else {})) + "\n")
    return out


def plan_devices(args: argparse.Namespace) -> list[tuple[AgentConfig, Any]]:
    """(config, data share) per device."""
    from edge_agent.localdata import load_local_data

    if args.devices < 1:
        raise ValueError(f"--devices is {args.devices}; it must be at least 1")
    tiers = spread(load_tiers(args.tiers), args.devices)
    control_plane = getattr(args, "control_plane", False)
    if control_plane and not args.data:
        from edge_agent.fleet import control_plane_share

        shares = [control_plane_share(i) for i in range(args.devices)]
    elif not args.data:
        raise ValueError("--data is required (or --control-plane, which makes a tiny synthetic share per device)")
    else:
        task = getattr(args, "task", "auto")
        data = load_local_data(args.data, text_column=args.text_column, label_column=args.label_column,
                               task=sniff_task(args.data) if task == "auto" else task)
        if args.max_examples:
            data = data.subset(range(min(args.max_examples, len(data))))
        shares = split_data(data, args.devices, args.alpha, args.seed)
    root = Path(args.state_root)
    out = []
    for i, (tier, share) in enumerate(zip(tiers, shares)):
        name = f"{args.name_prefix}-{tier.name}-{i}"
        config = AgentConfig(
            registry=args.registry, aggregator=args.aggregator, extractor=args.extractor, enroll_key=args.enroll_key,
            name=name, state_dir=str(root / name), model=args.model, tier=tier.tier, memory_mb=tier.memory_mb,
            gflops=tier.gflops, up_mbps=tier.up_mbps, down_mbps=tier.down_mbps, true_gflops=tier.true_gflops,
            true_up_mbps=tier.true_up_mbps, true_down_mbps=tier.true_down_mbps, max_rounds=args.max_rounds,
            threads=1 if control_plane else args.threads, progress="off", log_format=args.log_format,
        ).validate()
        out.append((config, share))
    return out


class StopFlag:
    """A stop request that a signal handler may set: unlike ``threading.Event.set`` it takes no lock, so a second
    signal arriving inside the first one's handler cannot deadlock."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def run_threads(devices: list[tuple[AgentConfig, Any]], stop: StopFlag | threading.Event | None = None) -> list[Any]:
    """Agents as threads of this process (signals handled here); returns the agents after they finish."""
    from edge_agent.agent import Agent

    agents = [Agent(config, dataset=share) for config, share in devices]
    threads = [threading.Thread(target=a.run, name=f"agent-{a.config.name}", daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            if stop is not None and stop.is_set():
                for a in agents:
                    a.stop("simulation stopped")
            for t in threads:
                t.join(timeout=0.2)
    except KeyboardInterrupt:
        for a in agents:
            a.stop("SIGINT")
        for t in threads:
            t.join(timeout=60)
    return agents


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# After a stop request, how long agents get to finish a step and report before SIGKILL: a step of a many-agent
# simulation sharing a few cores takes seconds, and a busy machine multiplies that.
AGENT_GRACE_S = 60.0


def run_processes(devices: list[tuple[AgentConfig, Any]]) -> int:
    """One agent process per device (``python -m edge_agent run``, i.e. ``raffm agent run``). SIGTERM, SIGINT and
    SIGHUP are forwarded (as SIGTERM); so is the death of the process that started this one (see
    :mod:`raffm.lifeline`). Each agent watches this process the same way, so none outlives it. Agents that have not
    exited ``AGENT_GRACE_S`` after a stop request are killed. Returns the worst exit status."""
    from raffm.lifeline import child_env, watch_parent

    procs: list[subprocess.Popen[bytes]] = []
    stop = StopFlag()

    def forward(signum: int = signal.SIGTERM, _frame: Any = None) -> None:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    old = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        for config, share in devices:
            if stop.is_set():
                break
            data_path = write_share(share, Path(config.state_dir) / "data")
            cmd = [sys.executable, "-m", "edge_agent", "run"]
            for key, value in {
                "registry": config.registry, "aggregator": config.aggregator, "extractor": config.extractor,
                "name": config.name, "state-dir": config.state_dir, "data": str(data_path), "model": config.model,
                "tier": config.tier, "memory-mb": config.memory_mb, "gflops": config.gflops,
                "up-mbps": config.up_mbps, "down-mbps": config.down_mbps, "true-gflops": config.true_gflops,
                "true-up-mbps": config.true_up_mbps, "true-down-mbps": config.true_down_mbps,
                "max-rounds": config.max_rounds, "threads": config.threads, "progress": "off",
                "log-format": config.log_format,
            }.items():
                cmd += [f"--{key}", str(value)]
            env = child_env({**os.environ, "RAFFM_AGENT_ENROLL_KEY": config.enroll_key})
            procs.append(subprocess.Popen(cmd, env=env))
            log.info("started %s (pid %d)", config.name, procs[-1].pid)
        if stop.is_set():  # a signal between a start and its record above: make sure every agent has it
            forward()
        watch_parent(lambda: forward(signal.SIGTERM))
        deadline: float | None = None
        killed = False
        while any(p.poll() is None for p in procs):
            if stop.is_set() and not killed:
                deadline = deadline or time.monotonic() + AGENT_GRACE_S
                if time.monotonic() > deadline:
                    killed = True
                    for p in procs:
                        if p.poll() is None:
                            log.warning("agent pid %d did not stop within %.0f s; killing it", p.pid, AGENT_GRACE_S)
                            p.kill()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for p in procs:
        p.wait()
    return max((p.returncode or 0) for p in procs) if procs else 0


def main(args: argparse.Namespace) -> int:
    from edge_agent.progress import setup_logging

    setup_logging(args.log_format)
    devices = plan_devices(args)
    if len(devices) <= 50:
        for config, share in devices:
            log.info("%s: %d MiB, %.0f GFLOP/s, %d examples, labels %s", config.name, config.memory_mb, config.gflops,
                     len(share), _label_counts(share))
    if args.mode in ("threads", "ray"):
        return _run_fleet(args, devices)
    if args.duration_s:
        raise ValueError("--duration-s needs --mode threads or ray (processes stop on SIGTERM)")
    return run_processes(devices)


def _run_fleet(args: argparse.Namespace, devices: list[tuple[AgentConfig, Any]]) -> int:
    """Threads or Ray actors, with a fleet report (and --stats-json)."""
    from edge_agent import fleet

    if args.mode == "ray":
        report = fleet.run_ray(devices, address=args.ray_address, actors=args.ray_actors,
                               duration_s=args.duration_s, start_spread_s=args.start_spread_s,
                               control_plane=args.control_plane)
    else:
        from raffm.lifeline import watch_parent

        stop = StopFlag()
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda _signum, _frame: stop.set())
        watch_parent(stop.set)
        report = fleet.run_threads_report(devices, duration_s=args.duration_s, start_spread_s=args.start_spread_s,
                                          control_plane=args.control_plane, stop=stop)
    if len(report.agents) <= 50:
        for a in report.agents:
            print(f"{a.name}: {a.outcomes}")
    fleet.print_report(report)
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(report.to_dict(), indent=1))
    return 1 if any(a.error for a in report.agents) else 0


def _label_counts(share: Any) -> dict[int, int]:
    counts: dict[int, int] = {}
    for y in split_keys(share):
        counts[y] = counts.get(y, 0) + 1
    return dict(sorted(counts.items()))


def with_overrides(config: AgentConfig, **values: Any) -> AgentConfig:
    return replace(config, **values)
