"""Emulated slowness for simulated fleets: a device that declares one profile but really has slower compute or links
(``--true-gflops``, ``--true-up-mbps``, ``--true-down-mbps``), so closed-loop sizing can be exercised on one machine.

:class:`Pace` stretches work to a rate: after ``units`` of work it waits until ``units / rate`` seconds have passed
since it started. Work that is already slower than the rate is not slowed further (a real device is never faster
than the host that emulates it).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Pace:
    """Holds work to ``rate`` units per second (0: no limit); ``wait`` sleeps (an agent passes its stopper's)."""

    def __init__(self, rate: float, wait: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0:
            raise ValueError(f"rate is {rate}; it must be >= 0 (0: no limit)")
        self.rate, self._wait, self._clock = rate, wait, clock
        self.started = clock()
        self.units = 0.0

    def done(self, units: float) -> None:
        """``units`` more work finished: wait until the total is no faster than the rate."""
        self.units += units
        if self.rate > 0:
            behind = self.started + self.units / self.rate - self._clock()
            if behind > 0:
                self._wait(behind)

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started
