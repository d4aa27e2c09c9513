"""Child processes that do not outlive their parent.

A process that starts others (``raffm demo``, ``raffm agent simulate``) puts its pid in their environment
(:func:`child_env`); a child that finds its parent there calls :func:`watch_parent` and, once that parent is gone
(killed with SIGKILL, crashed), stops itself the way SIGTERM would: gracefully, within about a second. No orphan
keeps a port or a database file.

Why polling ``getppid()`` and not Linux's ``PR_SET_PDEATHSIG``: that one is Linux-only, fires when the parent
*thread* that forked exits, and must be set from ``preexec_fn``, which is unsafe in a process with threads (gRPC's).
A child is reparented (to init or a subreaper) the moment its parent dies, so a changed parent pid is the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

PARENT_ENV = "RAFFM_PARENT_PID"


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) plus this process as the parent its children watch."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def terminate_self() -> None:
    """What a parent's death does by default: SIGTERM to this process, so its own graceful shutdown runs."""
    os.kill(os.getpid(), signal.SIGTERM)


def watch_parent(on_lost: Callable[[], object] = terminate_self, *, interval_s: float = 0.5,
                 env: Mapping[str, str] | None = None) -> threading.Thread | None:
    """Call ``on_lost`` once (from a daemon thread) when the parent named by ``$RAFFM_PARENT_PID`` is gone.

    Returns the watching thread, or None when there is nothing to watch: no such variable, or one naming a live
    process that is not this process's parent (inherited by accident; watching it would stop us for nothing).
    """
    value = (os.environ if env is None else env).get(PARENT_ENV, "")
    try:
        parent = int(value)
    except ValueError:
        return None
    if parent <= 1:
        return None
    if os.getppid() != parent and _alive(parent):
        log.debug("%s=%d is not this process's parent; not watching it", PARENT_ENV, parent)
        return None

    def watch() -> None:
        stop = threading.Event()
        while os.getppid() == parent:
            stop.wait(interval_s)
        log.warning("parent process %d exited; stopping", parent)
        on_lost()

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread
