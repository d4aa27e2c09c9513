"""Child processes of the `raffm` command: start them with their logs, wait until they serve, stop them in order.

What ``raffm demo`` (and the e2e tests) use to run the registry, extractor, aggregator and a fleet of agents as real
processes on one machine, each started as ``python -m raffm_app ...``. Nothing it starts outlives it:
- SIGTERM, SIGINT and SIGHUP become :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread while a
  :class:`SignalGuard` is installed, so the caller's ``finally`` stops every child, last started first;
- every child watches this process (:mod:`raffm.lifeline`) and stops itself if it dies without cleaning up.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from raffm.lifeline import child_env

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived (SIGTERM, SIGINT or SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class SignalGuard:
    """While installed (main thread only), the first stop signal raises :class:`Interrupted`; later ones are only
    counted (a second one while children are being stopped means: hurry). Inside :meth:`deferred`, the first one is
    held until the section ends, so a child is never started without being recorded."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: list[int] = []
        self._defer = 0
        self._raised = False

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received.append(signum)
        if self._defer or self._raised:
            return
        self._raised = True
        raise Interrupted(signum)

    @contextmanager
    def installed(self) -> Iterator[SignalGuard]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        try:
            yield self
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Inside, signals are only counted (e.g. while the children are being stopped anyway)."""
        raised, self._raised = self._raised, True
        try:
            yield
        finally:
            self._raised = raised

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
            if not self._defer and self.received and not self._raised:
                self._raised = True
                raise Interrupted(self.received[0])


def raffm_command(*args: str) -> list[str]:
    """The argv of ``raffm ARGS...`` run with this interpreter (no console script needed)."""
    return [sys.executable, "-m", "raffm_app", *args]


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for services started on chosen ports).

    Chosen below the kernel's ephemeral range where the kernel says what it is: the service binds it only later, and
    meanwhile any outgoing connection on the machine (a fleet's thousands) may be given an ephemeral port, which once
    took a port chosen here and stopped a service with "Address already in use"."""
    try:
        low = int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = random.sample(range(10_000, low), k=min(20, max(0, low - 10_000)))
    for port in [*candidates, 0]:  # port 0: the kernel's choice, when no candidate is free
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free loopback port")


class ProcessFailed(RuntimeError):
    """A child process exited while it should still be running; names the process and its log, and quotes the log's
    last lines (why it failed, where nobody can open the log: a CI run, a test's output)."""

    def __init__(self, name: str, code: int | None, log: Path, tail_lines: int = 15) -> None:
        try:
            tail = log.read_text(errors="replace").splitlines()[-tail_lines:]
        except OSError:
            tail = []
        super().__init__(f"{name} exited with code {code}; its log is {log}"
                         + "".join(f"\n  | {line}" for line in tail))
        self.name, self.code, self.log = name, code, log


class ProcessGroup:
    """Child processes with their logs, each in its own session and watching this process; stopped in the reverse
    order of their start (SIGTERM, then SIGKILL after its grace period, or at once on a second stop signal)."""

    def __init__(self, log_dir: Path, guard: SignalGuard | None = None, grace_s: float = 15.0) -> None:
        self.log_dir = log_dir
        self.guard = guard
        self.grace_s = grace_s
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path, TextIO]] = {}
        self.graces: dict[str, float] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
              grace_s: float | None = None) -> None:
        """Start ``argv`` as ``name``; ``grace_s`` (default: the group's) is how long it may take to stop after
        SIGTERM before it is killed: a process that stops children of its own needs their grace plus its own."""
        self.graces[name] = self.grace_s if grace_s is None else grace_s
        self.port_file(name).unlink(missing_ok=True)  # a previous run's
        log = self.log_dir / f"{name}.log"
        log.write_text("$ " + shlex.join(argv) + "\n")
        handle = log.open("a")  # O_APPEND: the child's lines and ours (how it ended) never overwrite each other
        with self.guard.deferred() if self.guard is not None else _nothing():
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=child_env(env),
                                    start_new_session=True)
            self.procs[name] = (proc, log, handle)

    def port_file(self, name: str) -> Path:
        """Where service ``name`` writes the ports it serves on (``--port-file``)."""
        return self.log_dir / f"{name}.ports"

    def check(self, *, allow_exit: Sequence[str] = ()) -> None:
        """Raise :class:`ProcessFailed` for the first process that died (a clean exit is fine for ``allow_exit``)."""
        for name, (proc, log, _) in self.procs.items():
            code = proc.poll()
            if code is not None and not (code == 0 and name in allow_exit):
                raise ProcessFailed(name, code, log)

    def stop(self) -> None:
        """Stop every child, the last started first (the fleet reports to the services before they go), each within
        its grace period; a further stop signal meanwhile kills what is left at once. Safe to call more than once."""
        guard = self.guard or SignalGuard()
        with guard.installed(), guard.quiet():
            seen = len(guard.received)
            for name, (proc, _, handle) in reversed(list(self.procs.items())):
                if handle.closed:
                    continue  # stopped by an earlier call
                how = "by itself"
                if proc.poll() is None:
                    _signal_group(proc, signal.SIGTERM)
                    how = "after SIGTERM"
                deadline = time.monotonic() + self.graces[name]
                while proc.poll() is None and time.monotonic() < deadline and len(guard.received) == seen:
                    time.sleep(0.05)
                if proc.poll() is None:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
                    how = "killed: " + ("a further stop signal" if len(guard.received) != seen
                                        else f"not stopped within {self.graces[name]:.0f} s")
                # The log says how its process ended, with a time to set beside the other logs'.
                stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:23]
                handle.write(f"{stamp} {name} exited with code {proc.returncode} ({how})\n")
                handle.close()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def serve_on_free_ports(group: ProcessGroup, name: str) -> list[str]:
    """The flags that start service ``name`` on a gRPC and a /metrics port it picks itself and writes to its port file
    (read by :func:`wait_serving`): no port is chosen here and bound later, when something else may have taken it."""
    return ["--port", "0", "--metrics-port", "0", "--port-file", str(group.port_file(name))]


def wait_serving(group: ProcessGroup, name: str, timeout_s: float = 180.0) -> dict[str, int]:
    """Block until service ``name`` serves, raising if its process died; its ports, ``{"grpc": ..., "metrics": ...}``.
    A service writes its port file once it serves (see :func:`serve_on_free_ports`). A process that dies is reported
    at once; the timeout is only for one that hangs, so it is roomy: a start imports torch, which takes a minute and
    more on a small, busy machine."""
    path = group.port_file(name)
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        group.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not start serving within {timeout_s:.0f} s; its log is "
                               f"{group.procs[name][1]}")
        time.sleep(0.1)
    return json.loads(path.read_text())
