"""The device profile: what one device can afford, as one type from the agent to the fitter, and the device classes.

The agent declares a :class:`DeviceProfile`, the registry stores it, the aggregator reads it back to plan a round,
and :mod:`raffm.planning` turns it plus the job into the fitter's :class:`raffm.fitting.RoundBudget`. Units follow
``raffm.v1.DeviceProfile`` (mapped in :mod:`raffm.proto`): memory in MiB, compute in sustained GFLOP/s, links in
Mbit/s (10^6 bit/s). This type only carries a profile; what is acceptable is decided by whoever accepts one (the
registry's validation rules, the fitter's bounds).
"""

from __future__ import annotations

from dataclasses import dataclass

# Device classes, also the `tier` metrics label: keep the set small (label cardinality).
TIERS = ("phone", "sbc", "jetson", "laptop", "desktop", "server")
# The tier label of a device whose class nobody declared.
UNKNOWN_TIER = "unknown"


@dataclass(frozen=True)
class DeviceProfile:
    """What a device can afford. ``infer_memory_mb`` 0 means "same as training"; the battery and the daily
    availability window (minutes after midnight UTC) are optional."""

    train_memory_mb: int
    gflops: float
    up_mbps: float
    down_mbps: float
    infer_memory_mb: int = 0
    tier: str = UNKNOWN_TIER
    battery_pct: float | None = None
    window_start_min: int | None = None
    window_end_min: int | None = None
