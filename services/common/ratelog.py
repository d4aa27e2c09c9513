"""Rate-limited logging: the first event of a kind is logged at once, repeats at most once per interval with a count.

For events a misbehaving (or hostile) client can cause at will, such as rejected uploads: each one is still counted
in the metrics, but the log says how many there were instead of growing by one line per request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable


class RateLimitedLog:
    """``log(key, msg, *args)``: logs when ``key`` was not logged in the last ``interval_s`` seconds, saying how many
    events of that key were held back meanwhile; thread-safe."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, *, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        self.logger, self.interval_s, self.level, self._clock, self._max_keys = logger, interval_s, level, clock, max_keys
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def log(self, key: str, msg: str, *args: object) -> bool:
        """Log (True) or count the event as held back (False)."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            if len(self._last) >= self._max_keys and key not in self._last:  # keys come from a closed set; be safe
                self._last.clear()
                self._held.clear()
            held = self._held.pop(key, 0)
            self._last[key] = now
        if held:
            msg += f" (and {held} more like it in the last {self.interval_s:g} s, not logged)"
        self.logger.log(self.level, msg, *args)
        return True
