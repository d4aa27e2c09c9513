"""What the agent shows: progress bars on a terminal, quiet structured logs otherwise.

On a TTY the download, the training steps and the upload get tqdm bars and logs are plain text. Under a service
manager (systemd, a container, a pipe) there are no bars and every log line is one JSON object
(``{"ts", "level", "logger", "msg", ...event fields}``) that log shippers can parse; progress then appears as a few
milestone events (every quarter) instead of a bar.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from types import TracebackType
from typing import Any, TextIO

# Attributes every LogRecord has; anything else was passed through `extra=` and is an event field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the ``extra=`` fields of the call merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def setup_logging(log_format: str = "auto", level: str = "info", *, stream: TextIO | None = None) -> None:
    """Configure the ``edge_agent`` logger (not the root logger, so embedding programs keep theirs)."""
    stream = stream or sys.stderr
    use_json = log_format == "json" or (log_format == "auto" and not is_tty(stream))
    handler = logging.StreamHandler(stream)
    if use_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("edge_agent")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


class Bar:
    """A progress bar (tqdm) or, without a terminal, milestone log events. Use as a context manager."""

    def __init__(self, desc: str, total: float, unit: str, *, enabled: bool, logger: logging.Logger,
                 unit_scale: bool = False, event: str = "progress", fields: dict[str, Any] | None = None) -> None:
        self.desc = desc
        self.total = total
        self.done = 0.0
        self._log = logger
        self._event = event
        self._fields = fields or {}
        self._next_milestone = 0.25
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=False, dynamic_ncols=True)

    def set_total(self, total: float) -> None:
        """The total, once it is known (a download learns it from the manifest, training from its first step)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total

    def reset_to(self, done: float) -> None:
        """Resume: the bar jumps to ``done`` (e.g. bytes already held)."""
        self.done = done
        if self._bar is not None:
            self._bar.n = done
            self._bar.refresh()

    def update(self, n: float = 1, **postfix: Any) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
        elif self.total and self.done / self.total >= self._next_milestone:
            pct = int(100 * min(1.0, self.done / self.total))
            self._log.debug("%s %d%%", self.desc, pct,
                            extra={"event": self._event, "pct": pct, **self._fields, **postfix})
            while self._next_milestone <= self.done / self.total:
                self._next_milestone += 0.25

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Progress:
    """Factory for :class:`Bar`; ``mode`` is auto (bars only on a terminal), on or off."""

    def __init__(self, mode: str = "auto", *, logger: logging.Logger | None = None) -> None:
        self.enabled = mode == "on" or (mode == "auto" and is_tty())
        self.log = logger or logging.getLogger("edge_agent.progress")

    def bar(self, desc: str, total: float, unit: str = "it", *, unit_scale: bool = False, event: str = "progress",
            **fields: Any) -> Bar:
        return Bar(desc, total, unit, enabled=self.enabled, logger=self.log, unit_scale=unit_scale, event=event,
                   fields=fields)
