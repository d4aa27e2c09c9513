"""Run every benchmark in bench/ and write bench/results/<YYYY-MM-DD>.md (what `make bench` does).

Each bench runs as its own process with the interpreter running this script; its output is captured to
``bench/results/<date>/<name>.txt`` and, for the benches that emit JSON, ``<name>.json``. The Markdown report is
built only from those files: every figure is printed by a bench, none is typed here. Every section states its
command, the machine (cores, memory) and the date.

    .venv/bin/python bench/run_all.py                 # default sizes (bench_fl alone takes up to an hour)
    .venv/bin/python bench/run_all.py --quick         # CI sizes: --quick (or a small equivalent) for every bench
    .venv/bin/python bench/run_all.py --only bench_fl,bench_flower
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)


@dataclass(frozen=True)
class Bench:
    name: str
    what: str
    default: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)
    json: bool = False  # accepts --json PATH
    timeout_s: int = 1200
    render: Callable[[dict[str, Any]], str] | None = field(default=None, compare=False)


def _render_fl(data: dict[str, Any]) -> str:
    import bench_fl

    return bench_fl.render(data)


def _render_flower(data: dict[str, Any]) -> str:
    import bench_flower

    return bench_flower.render(data)


def _render_core(data: dict[str, Any]) -> str:
    out = [f"Random BERT {data['model']}, {data['threads']} torch threads."]
    for t in data["tables"]:
        out += ["", f"{t['title']}", "", "| " + " | ".join(t["header"]) + " |", "|" + "---|" * len(t["header"])]
        out += ["| " + " | ".join(row) + " |" for row in t["rows"]]
    return "\n".join(out)


def _render_transfer(d: dict[str, Any]) -> str:
    return "\n".join([
        f"BERT hidden {d['hidden']}, {d['layers']} layers, full-model slice of {d['tensor_bytes'] / 1e6:.1f} MB in "
        f"{d['wire_dtype']}, chunk {d['chunk_kib']} KiB.",
        "",
        "| path | MB/s | ratio vs raw socket | wire bytes / tensor bytes |",
        "|---|---|---|---|",
        f"| raw loopback socket (baseline, same run) | {d['raw_socket_mb_s']:.0f} | 1.00 | - |",
        f"| DownloadSlice (sha256 verified) | {d['download_mb_s']:.0f} | {d['download_ratio']:.2f} | "
        f"{d['wire_overhead_download']:.4f} |",
        f"| UploadUpdate (staged, fsync, folded) | {d['upload_mb_s']:.0f} | {d['upload_ratio']:.2f} | "
        f"{d['wire_overhead_upload']:.4f} |",
    ])


def _render_scale(data: dict[str, Any]) -> str:
    import bench_scale

    return bench_scale.render(data)


SUITE: tuple[Bench, ...] = (
    Bench("bench_fl", "Accuracy per byte (RaFFM vs FedAvg, capable-only FedAvg, paper rule, HeteroFL) and inference "
          "scaling", json=True, timeout_s=4 * 3600, render=_render_fl),
    Bench("bench_flower", "A FedAvg round through Flower vs through RaFFM's services: bytes and framework time",
          json=True, timeout_s=1800, render=_render_flower),
    Bench("bench_transfer", "Slice download / update upload throughput vs a raw loopback socket", json=True,
          timeout_s=1200, render=_render_transfer),
    Bench("bench_core", "SPP and extraction time; sliced-FedAvg fold vs a plain add_", json=True, timeout_s=1200,
          render=_render_core),
    Bench("bench_registry", "Registry RPCs per second vs the health-check RPC", quick=("--seconds", "1", "--devices",
          "16"), timeout_s=900),
    Bench("bench_agent_memory", "Edge agent: predicted vs measured peak training memory",
          quick=("--budgets", "250", "600", "--steps", "2"), timeout_s=1800),
    Bench("bench_scale", "A thousand devices (SQLite vs PostgreSQL), object store vs directory store, aggregator "
          "memory and round close vs participants", json=True, timeout_s=3600, render=_render_scale),
)


def machine() -> dict[str, Any]:
    from raffm.report import machine_info

    info = machine_info()
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu"] = cpu or platform.processor()
    return info


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return rev + (" (working tree has uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_one(bench: Bench, quick: bool, out_dir: Path) -> dict[str, Any]:
    argv = [sys.executable, str(BENCH / f"{bench.name}.py"), *(bench.quick if quick else bench.default)]
    json_path = out_dir / f"{bench.name}.json"
    if bench.json:
        argv += ["--json", str(json_path)]
    log_path = out_dir / f"{bench.name}.txt"
    shown = shlex.join([".venv/bin/python" if a == sys.executable else
                        str(Path(a).relative_to(REPO)) if a.startswith(str(REPO)) else a for a in argv])
    print(f"$ {shown}", flush=True)
    started_at = dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        log.write(f"$ {shown}\n")
        log.flush()
        try:
            proc = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=bench.timeout_s)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
            log.write(f"\n[run_all] timed out after {bench.timeout_s} s\n")
    seconds = time.perf_counter() - t0
    data = json.loads(json_path.read_text()) if bench.json and json_path.exists() else None
    status = "ok" if code == 0 else ("timed out" if code is None else f"exit {code}")
    print(f"  {status} in {seconds:.0f} s", flush=True)
    return {"bench": bench, "command": shown, "started": started_at.isoformat(timespec="seconds"),
            "seconds": seconds, "status": status, "data": data, "log": log_path}


def recorded(bench: Bench, out_dir: Path) -> dict[str, Any] | None:
    """A finished run of ``bench`` from its raw output and JSON (the JSON carries its own command, date, duration)."""
    log_path, json_path = out_dir / f"{bench.name}.txt", out_dir / f"{bench.name}.json"
    if not log_path.exists():
        return None
    data = json.loads(json_path.read_text()) if json_path.exists() else None
    command = log_path.read_text(errors="replace").splitlines()[0].removeprefix("$ ")
    return {"bench": bench, "command": command, "started": (data or {}).get("date", "unknown"),
            "seconds": (data or {}).get("seconds"), "status": "ok" if data is not None else "no JSON",
            "data": data, "log": log_path}


def _tail(path: Path, limit: int = 6000) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines()
             if "Loading weights" not in line and "\x1b[" not in line]
    text = "\n".join(lines[1:])  # the first line repeats the command
    return text[-limit:]


def report(results: list[dict[str, Any]], info: dict[str, Any], quick: bool, date: str) -> str:
    mem = f"{info['memory_gib']} GiB" if info.get("memory_gib") else "unknown memory"
    machine_line = f"{info['cores']} cores ({info.get('cpu', '')}), {mem}, {info['platform']}, Python {info['python']}, " \
                   f"torch {info.get('torch', '?')}"
    out = [
        f"# Benchmarks, {date}{' (quick sizes)' if quick else ''}",
        "",
        f"Written by `bench/run_all.py{' --quick' if quick else ''}`; every figure below was printed by the bench named "
        "in its section (raw output and JSON next to this file, in the folder of the same date). Ratios are "
        "against a baseline measured in the same run.",
        "",
        f"- Machine: {machine_line}",
        f"- Code: git {git_revision()}",
        "",
    ]
    for r in results:
        b: Bench = r["bench"]
        out += [
            f"## {b.name}: {b.what}",
            "",
            f"- Command: `{r['command']}`",
            f"- Machine: {info['cores']} cores, {mem}",
            f"- Date: {r['started']} ("
            + (f"{r['seconds']:.0f} s" if r["seconds"] is not None else "duration not recorded")
            + f", {r['status']})",
            f"- Raw output: `{os.path.relpath(r['log'], BENCH)}`",
            "",
        ]
        if b.render is not None and r["data"] is not None:
            out.append(b.render(r["data"]))
        else:
            out += ["```", _tail(r["log"]), "```"]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI sizes for every bench")
    parser.add_argument("--only", help="comma-separated bench names (default: all): "
                        + ",".join(b.name for b in SUITE))
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="results folder")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the report from the raw outputs already in the results folder, running nothing")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    suite = SUITE
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {b.name for b in SUITE}
        if unknown:
            parser.error(f"unknown bench(es) {sorted(unknown)}")
        suite = tuple(b for b in SUITE if b.name in wanted)
    missing = [p.name for p in BENCH.glob("bench_*.py") if p.stem not in {b.name for b in SUITE}]
    if missing:
        print(f"note: not in run_all's suite (add them to SUITE): {', '.join(sorted(missing))}")
    date = dt.date.today().isoformat()
    out_dir = args.out / date
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    if args.render_only:
        results = [r for r in (recorded(b, out_dir) for b in suite) if r is not None]
    else:
        results = [run_one(b, args.quick, out_dir) for b in suite]
    md = args.out / f"{date}.md"
    md.write_text(report(results, info, args.quick, date))
    print(f"wrote {md}")
    failed = [r["bench"].name for r in results if r["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
