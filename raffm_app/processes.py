"""Child processes of the `raffm` command: start them with their logs, wait until they serve, stop them together.

What ``raffm demo`` (and the e2e tests) use to run the registry, extractor, aggregator and a fleet of agents as real
processes on one machine, each started as ``python -m raffm_app ...``.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO


def raffm_command(*args: str) -> list[str]:
    """The argv of ``raffm ARGS...`` run with this interpreter (no console script needed)."""
    return [sys.executable, "-m", "raffm_app", *args]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for services started on chosen ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessFailed(RuntimeError):
    """A child process exited while it should still be running; names the process and its log."""

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


def print_tail(log: Path, lines: int = 15) -> None:
    """The last ``lines`` lines of a child's log on stderr (after it failed)."""
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print("\n".join("  | " + line for line in tail), file=sys.stderr)


def wait_serving(group: ProcessGroup, address: str, name: str, timeout_s: float = 60.0) -> None:
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
