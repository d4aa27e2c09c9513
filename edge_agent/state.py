"""The agent's durable state: its device id and token, kept in one small JSON file.

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the directory), so a crash or a
SIGTERM at any moment leaves either the old file or the new one, never half of either. The file holds a bearer token,
so it is created readable by its owner only. A lock file stops two agents from sharing one state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

STATE_FILE = "agent-state.json"
LOCK_FILE = "agent.lock"
VERSION = 1


@dataclass(frozen=True)
class AgentState:
    """What survives a restart."""

    device_id: str = ""
    token: str = ""
    name: str = ""
    registry: str = ""
    registered_at: str = ""
    # Rounds this device finished (uploaded) and the assignment it was working on, for operators reading the file.
    rounds_done: int = 0
    last_round_id: str = ""
    history: tuple[str, ...] = field(default_factory=tuple)  # last few "round_id:outcome" entries

    @property
    def registered(self) -> bool:
        return bool(self.device_id and self.token)


def load_state(state_dir: Path) -> AgentState:
    """The saved state, or an empty one; a corrupt file is an error naming it (never silently re-registered)."""
    path = state_dir / STATE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return AgentState()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"state file {path} is unreadable ({exc}); move it away to register as a new device"
        ) from exc
    if not isinstance(raw, dict):
        raise ValueError(f"state file {path} is not a JSON object; move it away to register as a new device")
    known = {f.name for f in fields(AgentState)}
    values: dict[str, Any] = {k: v for k, v in raw.items() if k in known}
    values["history"] = tuple(values.get("history", ()))
    return AgentState(**values)


def save_state(state_dir: Path, state: AgentState) -> None:
    """Atomically replace the state file (owner read/write only)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    payload = asdict(state)
    payload["history"] = list(state.history)[-20:]
    payload["version"] = VERSION
    data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=".agent-state-", suffix=".tmp", dir=state_dir)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(state_dir)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def clean_temporaries(state_dir: Path) -> int:
    """Remove temporary files a killed writer left behind; returns how many."""
    removed = 0
    for tmp in state_dir.glob(".agent-state-*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed += 1
    return removed


class StateLock:
    """An exclusive, non-blocking lock on the state directory for the agent's lifetime."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> StateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ValueError(
                f"another agent is using state directory {self.path.parent}; give each agent its own --state-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
