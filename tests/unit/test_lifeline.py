"""raffm.lifeline with real processes: a child started with :func:`child_env` stops when its parent dies without
cleaning up (SIGKILL), and a process that merely inherited the variable from an ancestor does not watch anyone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

from raffm.lifeline import PARENT_ENV, child_env, watch_parent

# The child: watches its parent; when it is gone, runs its SIGTERM handler (what a service's graceful stop is).
CHILD = textwrap.dedent("""
    import signal, sys, time
    from raffm.lifeline import watch_parent
    def on_term(signum, frame):
        open(sys.argv[1], "w").write("stopped gracefully")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    assert watch_parent(interval_s=0.1) is not None
    print("watching", flush=True)
    time.sleep(600)
""")

# The parent: starts the child with itself named in its environment, says the child's pid, then waits forever.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from raffm.lifeline import child_env
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=child_env(),
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "watching"
    print(child.pid, flush=True)
    time.sleep(600)
""")


def test_a_child_stops_gracefully_when_its_parent_is_killed(tmp_path: Path) -> None:
    marker = tmp_path / "stopped"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    child = None
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait()
        _, alive = psutil.wait_procs([child], timeout=60)  # an upper bound; the watch interval is 0.1 s
        assert alive == [], "the child outlived its killed parent"
        assert marker.read_text() == "stopped gracefully"
    finally:
        parent.kill()
        if child is not None and child.is_running():
            child.kill()


def test_only_the_named_parent_is_watched() -> None:
    assert PARENT_ENV not in os.environ or os.environ[PARENT_ENV] != str(os.getpid())
    assert watch_parent(env={}) is None  # nobody to watch
    assert watch_parent(env={PARENT_ENV: "not a pid"}) is None
    # Inherited from an ancestor that is alive but is not our parent: watching it would stop us for nothing.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert watch_parent(env={PARENT_ENV: str(other.pid)}) is None
    finally:
        other.kill()
        other.wait()
    assert child_env({})[PARENT_ENV] == str(os.getpid())
