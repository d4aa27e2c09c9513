"""The device profile: what one device can afford, as one type from the agent to the fitter, and the device classes.

The agent declares a :class:`DeviceProfile`, the registry stores it, the aggregator reads it back to plan a round,
and :mod:`raffm.planning` turns it plus the job into the fitter's :class:`raffm.fitting.RoundBudget`. Units follow
``raffm.v1.DeviceProfile`` (mapped here, not in :mod:`raffm.proto`: this module imports no torch): memory in MiB, compute in sustained GFLOP/s, links in
Mbit/s (10^6 bit/s). This type only carries a profile; what is acceptable is decided by whoever accepts one (the
registry's validation rules, the fitter's bounds).
"""

from __future__ import annotations

from dataclasses import dataclass

from raffm.v1 import common_pb2

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


def profile_to_proto(profile: DeviceProfile) -> common_pb2.DeviceProfile:
    msg = common_pb2.DeviceProfile(
        train_memory_mb=int(profile.train_memory_mb), infer_memory_mb=int(profile.infer_memory_mb),
        gflops=profile.gflops, up_mbps=profile.up_mbps, down_mbps=profile.down_mbps, tier=profile.tier,
    )
    if profile.battery_pct is not None:
        msg.battery_pct = profile.battery_pct
    if profile.window_start_min is not None and profile.window_end_min is not None:
        msg.availability.start_minute_utc = profile.window_start_min
        msg.availability.end_minute_utc = profile.window_end_min
    return msg


def profile_from_proto(msg: common_pb2.DeviceProfile) -> DeviceProfile:
    """The profile a message carries, as sent (an empty tier stays empty: the receiver decides what that means)."""
    window = msg.availability if msg.HasField("availability") else None
    return DeviceProfile(
        train_memory_mb=msg.train_memory_mb,
        infer_memory_mb=msg.infer_memory_mb,
        gflops=msg.gflops,
        up_mbps=msg.up_mbps,
        down_mbps=msg.down_mbps,
        tier=msg.tier,
        battery_pct=msg.battery_pct if msg.HasField("battery_pct") else None,
        window_start_min=window.start_minute_utc if window is not None else None,
        window_end_min=window.end_minute_utc if window is not None else None,
    )
