"""Issue 17: `raffm demo` stopped the way schedulers, CI runners, `timeout` and containers stop programs leaves no
orphans. SIGTERM and SIGHUP stop every process it started, in order (the fleet, then the aggregator, the extractor,
the registry), and the demo exits non-zero with one line naming the run directory. SIGKILL gives it no chance to
clean up: its children notice on their own and exit. Afterwards no process of the run remains and its ports take
new servers."""

from __future__ import annotations

import http.server
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from tests.e2e.test_demo import TIERS

WAIT_S = 300.0  # an upper bound for slow, shared machines; no assertion is about time


class Demo:
    """A `raffm demo` process whose output is read as it comes."""

    def __init__(self, model: Path, tmp_path: Path) -> None:
        tiers = tmp_path / "tiers.toml"
        tiers.write_text(TIERS)
        self.run_dir = tmp_path / "run"
        # Many rounds of many steps: the fleet is still training whenever the signal comes.
        cmd = [sys.executable, "-m", "raffm_app", "demo", "--model", str(model), "--devices", "2", "--rounds", "5",
               "--local-steps", "500", "--seq-len", "16", "--test-size", "40", "--max-train", "200",
               "--tiers", str(tiers), "--round-deadline-s", "600", "--progress-s", "60", "--out", str(self.run_dir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.stdout) + "\n--- stderr ---\n" + "\n".join(self.stderr[-40:])

    def wait_for(self, predicate: Callable[[], Any], what: str) -> Any:
        end = time.monotonic() + WAIT_S
        while not (value := predicate()):
            if self.proc.poll() is not None:
                raise AssertionError(f"the demo exited ({self.proc.returncode}) before {what}:\n{self.output()}")
            if time.monotonic() > end:
                raise AssertionError(f"no {what} within {WAIT_S} s:\n{self.output()}")
            time.sleep(0.2)
        return value

    def ports(self) -> list[int]:
        """The gRPC and metrics ports of its three services, from its 'services up' line."""
        line = next(line for line in self.stdout if line.startswith("services up:"))
        return [int(p) for p in re.findall(r":(\d+)", line)]

    def processes(self) -> list[psutil.Process]:
        return run_processes(self.run_dir)

    def agents(self) -> list[psutil.Process]:
        return [p for p in self.processes() if "edge_agent" in " ".join(_cmdline(p))]

    def kill_all(self) -> None:
        for p in self.processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def run_processes(run_dir: Path) -> list[psutil.Process]:
    """Live processes of a run: every process the demo starts names the run directory in its arguments."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:  # exited; only its exit status is left for a parent to read
                continue
        except psutil.NoSuchProcess:
            continue
        if any(str(run_dir) in arg for arg in _cmdline(p)):
            out.append(p)
    return out


def assert_ports_take_new_servers(ports: list[int]) -> None:
    assert len(ports) == 6, ports
    grpc_ports, metrics_ports = ports[0::2], ports[1::2]
    for port in grpc_ports:
        server = grpc.server(ThreadPoolExecutor(1), options=[("grpc.so_reuseport", 0)])
        try:
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        finally:
            server.stop(None)
    for port in metrics_ports:
        with http.server.HTTPServer(("127.0.0.1", port), http.server.BaseHTTPRequestHandler):
            pass


def _logged_at(log: Path, text: str) -> datetime:
    """When a line with ``text`` was logged (the services' and the demo's lines start with a local time)."""
    for line in log.read_text().splitlines():
        if text in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone(timezone.utc)
    raise AssertionError(f"{log.name} has no {text!r}:\n{log.read_text()[-2000:]}")


def _agents_stopped_at(log: Path) -> list[datetime]:
    """When each agent logged its graceful stop (JSON lines, UTC)."""
    times = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and '"event": "stopped"' in line:
            ts = datetime.strptime(json.loads(line)["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
            times.append(ts.replace(tzinfo=timezone.utc))
    return times


def _started(model: Path, tmp_path: Path) -> Demo:
    demo = Demo(model, tmp_path)
    try:
        demo.wait_for(lambda: any(line.startswith("services up:") for line in demo.stdout), "services up")
        demo.wait_for(lambda: len(demo.agents()) == 2, "two agent processes")
        fleet_log = demo.run_dir / "logs" / "fleet.log"
        demo.wait_for(lambda: fleet_log.read_text().count('"event": "assignment"') >= 2, "both agents in a round")
    except BaseException:
        demo.kill_all()
        raise
    return demo


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_stops_everything_in_order_and_names_the_run_directory(
        tiny_model: Path, tmp_path: Path, sig: signal.Signals) -> None:
    demo = _started(tiny_model, tmp_path)
    try:
        ports = demo.ports()
        demo.proc.send_signal(sig)
        rc = demo.proc.wait(timeout=WAIT_S)
        time.sleep(0.5)  # let the reader threads take the last lines
        assert rc == 128 + sig, f"exit status {rc}:\n{demo.output()}"
        assert demo.stderr[-1] == (f"raffm demo: stopped by {sig.name}; every process it started has exited; "
                                   f"run directory: {demo.run_dir}"), demo.output()
        assert sum("stopped by" in line for line in demo.stderr) == 1
        assert demo.processes() == []  # the demo waited for all of them
        assert_ports_take_new_servers(ports)

        # Each one gracefully (its own stop, exit status 0), and in order: the agents finished their step and
        # stopped, the fleet exited, then the aggregator was asked to stop and exited, then the extractor, then the
        # registry.
        logs = demo.run_dir / "logs"
        agents = _agents_stopped_at(logs / "fleet.log")
        assert len(agents) == 2, (logs / "fleet.log").read_text()[-3000:]
        order = [max(agents), _logged_at(logs / "fleet.log", "fleet exited with code 0 (after SIGTERM)")]
        for name in ("aggregator", "extractor", "registry"):
            order.append(_logged_at(logs / f"{name}.log", "stop requested; draining"))
            order.append(_logged_at(logs / f"{name}.log", f"{name} exited with code 0 (after SIGTERM)"))
        assert order == sorted(order), order
    finally:
        demo.kill_all()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_after_sigkill_the_demos_children_exit_on_their_own(tiny_model: Path, tmp_path: Path) -> None:
    demo = _started(tiny_model, tmp_path)
    try:
        ports = demo.ports()
        demo.proc.kill()
        demo.proc.wait(timeout=60)
        end = time.monotonic() + WAIT_S
        while (left := demo.processes()) and time.monotonic() < end:
            time.sleep(0.5)
        assert left == [], [" ".join(_cmdline(p))[:200] for p in left]
        assert_ports_take_new_servers(ports)
        logs = demo.run_dir / "logs"
        for name in ("registry", "extractor", "aggregator"):
            text = (logs / f"{name}.log").read_text()
            assert f"parent process {demo.proc.pid} exited; stopping" in text, text[-2000:]
            assert "stopped 127.0.0.1:" in text  # a graceful stop, not a kill
        fleet = (logs / "fleet.log").read_text()
        assert f"parent process {demo.proc.pid} exited; stopping" in fleet, fleet[-3000:]  # the simulator's lifeline
        assert len(_agents_stopped_at(logs / "fleet.log")) == 2, fleet[-3000:]  # each agent stopped gracefully
    finally:
        demo.kill_all()
