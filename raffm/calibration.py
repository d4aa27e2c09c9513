"""Closed-loop sizing: a per-device correction of the cost model's predictions, learned from what rounds really cost.

A device declares its memory, GFLOP/s and links once; what it then measures each round (peak training memory,
seconds of training per sample, download and upload throughput) is turned into one :class:`Observation` of
*measured / predicted* ratios, each against the prediction the **declared** profile gives (so corrections never
compound). :func:`estimate` folds a device's recent observations into a :class:`Calibration`:

- compute and links: the median of the last ``window`` log-ratios (robust to one outlier round from three rounds on;
  with two, the one nearer the declared profile; with one, half of it in log space, so a single odd round moves the
  plan at most half-way);
- memory: the largest recent ratio, never below 1 (a device never plans above its declared budget, and one round that
  used more than predicted shrinks the next plans at once: running out of memory costs the whole round). The measured
  peak is taken less the fitter's fixed margin (:data:`raffm.fitting.HEADROOM_MB`), which is there for a round's fixed
  runtime costs: a device's first round also pays one-off allocations that stay with the process (code paths, kernel
  and transfer caches: 8-21 MiB on MiniLM, which later rounds no longer measure), and a cost the margin already
  covers must not also be charged as a ratio;
- every factor bounded to ``[1/max_factor, max_factor]``, and decaying (in log space, with ``half_life_s``) toward the
  declared profile when the device has not reported for a while;
- besides the ratios, the device's fixed cost of a round (``overhead_s``: the round's wall time from assignment to
  accepted upload, less its download, training and upload): the median of recent rounds (none from a single round),
  bounded, decaying to 0.

:func:`corrected_profile` applies a calibration to the declared profile; planning then runs the strategy's fitter on
the corrected one. :class:`CalibrationBook` keeps the recent observations of each device, in memory (rebuildable from
the round store's reports). Pure: no IO, no clock (callers pass ``now``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from raffm.fitting import HEADROOM_MB
from raffm.profile import DeviceProfile

QUANTITIES = ("memory", "compute", "down", "up")


@dataclass(frozen=True)
class Observation:
    """One round's measured / predicted ratios (None: not measured). > 1 means the device was slower (or used more
    memory) than its declared profile predicts."""

    at: float  # when it was reported, seconds since the epoch
    memory: float | None = None  # measured peak training MiB, less HEADROOM_MB, / predicted
    compute: float | None = None  # measured training seconds per sample / predicted at the declared GFLOP/s
    down: float | None = None  # declared down Mbit/s / measured download throughput
    up: float | None = None  # declared up Mbit/s / measured upload throughput
    samples: int = 0  # samples trained in the round (the device's work per round in epoch mode)
    overhead_s: float | None = None  # round wall time not spent downloading, training or uploading

    def __post_init__(self) -> None:
        for q in QUANTITIES:
            v = getattr(self, q)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"observation {q} ratio is {v!r}; it must be a finite number > 0 (or None)")
        if self.overhead_s is not None and not (self.overhead_s >= 0 and math.isfinite(self.overhead_s)):
            raise ValueError(f"observation overhead_s is {self.overhead_s!r}; it must be a finite number >= 0")
        if self.samples < 0:
            raise ValueError(f"observation samples is {self.samples}; it must be >= 0")


@dataclass(frozen=True)
class CalibrationPolicy:
    window: int = 5  # observations kept per device
    max_factor: float = 8.0  # corrections bounded to [1/max_factor, max_factor]
    half_life_s: float = 6 * 3600.0  # a quiet device's correction halves (in log space) every half-life
    max_overhead_s: float = 600.0  # bound of the learned fixed cost of a round

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"calibration window is {self.window}; it must be >= 1")
        if not self.max_factor >= 1:
            raise ValueError(f"calibration max_factor is {self.max_factor}; it must be >= 1")
        if not self.half_life_s > 0:
            raise ValueError(f"calibration half_life_s is {self.half_life_s}; it must be > 0")


@dataclass(frozen=True)
class Calibration:
    """Multiplicative corrections of a declared profile's predictions (1.0: trust the declaration)."""

    memory: float = 1.0  # predicted memory x this; always >= 1
    compute: float = 1.0  # predicted compute seconds x this
    down: float = 1.0  # predicted download seconds x this
    up: float = 1.0  # predicted upload seconds x this
    samples: int = 0  # samples the device trained in its last reported round (0: unknown)
    overhead_s: float = 0.0  # seconds a round costs the device besides download, training and upload
    observations: int = 0

    def to_dict(self) -> dict[str, float]:
        return {"memory": self.memory, "compute": self.compute, "down": self.down, "up": self.up,
                "samples": float(self.samples), "overhead_s": self.overhead_s,
                "observations": float(self.observations)}


IDENTITY = Calibration()


def _robust_log(values: list[float]) -> float:
    """Median of log-ratios, robust to one outlier from three values on (see the module docstring)."""
    logs = sorted(math.log(v) for v in values)
    n = len(logs)
    if n == 1:
        return logs[0] / 2
    if n == 2:
        a, b = logs
        return 0.0 if a * b < 0 else min(a, b, key=abs)
    mid = n // 2
    return logs[mid] if n % 2 else (logs[mid - 1] + logs[mid]) / 2


def estimate(history: Iterable[Observation], now: float, policy: CalibrationPolicy = CalibrationPolicy()
             ) -> Calibration:
    """A device's calibration from its observations (any order; the newest ``policy.window`` count)."""
    recent = sorted(history, key=lambda o: o.at)[-policy.window:]
    if not recent:
        return IDENTITY
    quiet = max(0.0, now - recent[-1].at)
    decay = 0.5 ** (quiet / policy.half_life_s)
    bound = math.log(policy.max_factor)
    factors: dict[str, float] = {}
    for q in QUANTITIES:
        values = [v for v in (getattr(o, q) for o in recent) if v is not None]
        if not values:
            factors[q] = 1.0
            continue
        log_f = max(math.log(v) for v in values) if q == "memory" else _robust_log(values)
        log_f = max(-bound, min(bound, log_f)) * decay
        factors[q] = math.exp(log_f)
    factors["memory"] = max(1.0, factors["memory"])
    samples = next((o.samples for o in reversed(recent) if o.samples > 0), 0)
    overheads = sorted(o.overhead_s for o in recent if o.overhead_s is not None)
    overhead = 0.0
    # The median; of two, the smaller; of one, none: a first round pays one-time costs (loading, warm-up) that a
    # single sample cannot tell from recurring ones, and must not lock a device out of the next round.
    if len(overheads) >= 2:
        mid = len(overheads) // 2
        overhead = overheads[mid] if len(overheads) % 2 else min(overheads[mid - 1:mid + 1])
    overhead = min(overhead, policy.max_overhead_s) * decay
    return Calibration(memory=factors["memory"], compute=factors["compute"], down=factors["down"], up=factors["up"],
                       samples=samples, overhead_s=overhead, observations=len(recent))


def corrected_profile(profile: DeviceProfile, cal: Calibration) -> DeviceProfile:
    """The profile planning should use: GFLOP/s and links scaled by the learned corrections, memory only ever
    reduced (never above the declared budget)."""
    return replace(profile, gflops=profile.gflops / cal.compute, up_mbps=profile.up_mbps / cal.up,
                   down_mbps=profile.down_mbps / cal.down,
                   train_memory_mb=max(1, int(profile.train_memory_mb / max(cal.memory, 1.0))))


def _ratio(measured: float, predicted: float) -> float | None:
    if measured > 0 and predicted > 0 and math.isfinite(measured) and math.isfinite(predicted):
        return measured / predicted
    return None


def observe(report: Mapping[str, float], predicted: Mapping[str, float], at: float) -> Observation:
    """One round's observation from a device's report and what was predicted for it.

    ``report``: ``peak_memory_mb``, ``seconds`` (of training), ``samples``, ``download_mbps``, ``upload_mbps``,
    and for the overhead ``round_seconds``, ``download_seconds``, ``upload_seconds`` (missing or 0: not measured). ``predicted``: the plan's ``train_memory_mb`` and ``flops_per_sample`` and the
    declared ``declared_gflops``, ``declared_down_mbps``, ``declared_up_mbps``.
    """
    samples = int(report.get("samples", 0) or 0)
    compute = None
    seconds, flops = float(report.get("seconds", 0) or 0), float(predicted.get("flops_per_sample", 0) or 0)
    gflops = float(predicted.get("declared_gflops", 0) or 0)
    if samples > 0 and flops > 0 and gflops > 0:
        compute = _ratio(seconds / samples, flops / (gflops * 1e9))
    parts = [float(report.get(k, 0) or 0) for k in ("round_seconds", "download_seconds", "seconds", "upload_seconds")]
    overhead = max(0.0, parts[0] - sum(parts[1:])) if parts[0] > 0 and math.isfinite(sum(parts)) else None
    beyond_margin = float(report.get("peak_memory_mb", 0) or 0) - HEADROOM_MB  # see the module docstring
    return Observation(
        at=at, overhead_s=overhead,
        memory=_ratio(beyond_margin, float(predicted.get("train_memory_mb", 0) or 0)),
        compute=compute,
        down=_ratio(float(predicted.get("declared_down_mbps", 0) or 0), float(report.get("download_mbps", 0) or 0))
        if _mostly_streamed(report, predicted) else None,
        up=_ratio(float(predicted.get("declared_up_mbps", 0) or 0), float(report.get("upload_mbps", 0) or 0)),
        samples=samples,
    )


def _mostly_streamed(report: Mapping[str, float], predicted: Mapping[str, float]) -> bool:
    """Whether the download moved most of the slice: when the device's cache held most of it (the frozen embeddings
    after the first round), the few bytes left take a fixed latency, and their "throughput" says nothing about the
    link (measured: it read as a link 8x slower than declared and priced every later plan out of the round)."""
    wire = float(predicted.get("wire_bytes", 0) or 0)
    return wire <= 0 or float(report.get("download_bytes", 0) or 0) >= 0.5 * wire


class CalibrationBook:
    """The recent observations of every device (the newest ``policy.window`` each) and their calibrations."""

    def __init__(self, policy: CalibrationPolicy = CalibrationPolicy(), *, enabled: bool = True) -> None:
        self.policy, self.enabled = policy, enabled
        self._history: dict[str, deque[Observation]] = {}

    def add(self, device_id: str, obs: Observation) -> None:
        self._history.setdefault(device_id, deque(maxlen=self.policy.window)).append(obs)

    def history(self, device_id: str) -> list[Observation]:
        return list(self._history.get(device_id, ()))

    def calibration(self, device_id: str, now: float) -> Calibration:
        """The device's calibration now; the identity when calibration is off (then only ``samples`` is kept: the
        work a device really does is a fact, not a correction)."""
        cal = estimate(self.history(device_id), now, self.policy)
        return cal if self.enabled else replace(IDENTITY, samples=cal.samples, observations=cal.observations)

    def __len__(self) -> int:
        return len(self._history)


def replayed(book: CalibrationBook, reports: Iterable[tuple[str, Observation]]) -> CalibrationBook:
    """``book`` with ``reports`` (device id, observation) added in order; for rebuilding after a restart."""
    for device_id, obs in reports:
        book.add(device_id, obs)
    return book


def ratios(obs: Observation) -> Mapping[str, float]:
    """The measured ratios of an observation (for metrics): quantity -> ratio."""
    return {q: v for q in QUANTITIES if (v := getattr(obs, q)) is not None}
