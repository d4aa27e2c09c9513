"""Registry domain: value objects, validation and liveness rules. Pure; no IO."""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from raffm.errors import ValidationError, excerpt
from raffm.profile import TIERS, DeviceProfile

MAX_NAME_LEN = 128
MAX_FLEET_LEN = 64
# Upper bounds well above any real edge device; larger values are typos or unit mistakes (bytes for MiB, ...).
MAX_MEMORY_MB = 4 * 1024 * 1024  # 4 TiB
MAX_GFLOPS = 10_000_000.0  # 10 PFLOP/s
MAX_MBPS = 1_000_000.0  # 1 Tbit/s
MINUTES_PER_DAY = 24 * 60
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]+$")
# A token a device proposes for itself: what fits an "authorization: Bearer" header, long enough to be a secret.
MIN_PROPOSED_TOKEN_LEN, MAX_PROPOSED_TOKEN_LEN = 32, 256
_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")


class DeviceState(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"
    DEREGISTERED = "deregistered"


@dataclass(frozen=True)
class Device:
    device_id: str
    name: str
    fleet: str
    state: DeviceState
    tier: str
    profile: DeviceProfile
    profile_version: int
    created_at: datetime
    last_seen: datetime


@dataclass(frozen=True)
class ProfileRecord:
    version: int
    profile: DeviceProfile
    recorded_at: datetime


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise ValidationError(f"{field} must be a finite number, got {excerpt(value)}", field=field)
    return float(value)


def _in_range(value: float, lo: float, hi: float, field: str, unit: str, *, lo_open: bool) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ValidationError(f"{field} must be {bound} and <= {hi:g} {unit}, got {value:g}", field=field)


def validate_profile(profile: DeviceProfile) -> DeviceProfile:
    """Reject impossible or absurd resources and unknown tiers; returns the profile unchanged."""
    f = "profile."
    _in_range(profile.train_memory_mb, 0, MAX_MEMORY_MB, f + "train_memory_mb", "MiB", lo_open=True)
    _in_range(profile.infer_memory_mb, 0, MAX_MEMORY_MB, f + "infer_memory_mb", "MiB (0 = same as training)",
              lo_open=False)
    _in_range(_finite(profile.gflops, f + "gflops"), 0, MAX_GFLOPS, f + "gflops", "GFLOP/s", lo_open=True)
    _in_range(_finite(profile.up_mbps, f + "up_mbps"), 0, MAX_MBPS, f + "up_mbps", "Mbit/s", lo_open=True)
    _in_range(_finite(profile.down_mbps, f + "down_mbps"), 0, MAX_MBPS, f + "down_mbps", "Mbit/s", lo_open=True)
    if profile.tier not in TIERS:
        raise ValidationError(f"{f}tier {excerpt(profile.tier)} is unknown; use one of {', '.join(TIERS)}",
                              field=f + "tier")
    if profile.battery_pct is not None:
        _in_range(_finite(profile.battery_pct, f + "battery_pct"), 0, 100, f + "battery_pct", "%", lo_open=False)
    if (profile.window_start_min is None) != (profile.window_end_min is None):
        raise ValidationError("profile.availability needs both start and end", field=f + "availability")
    for name in ("window_start_min", "window_end_min"):
        value = getattr(profile, name)
        if value is not None and not 0 <= value < MINUTES_PER_DAY:
            field = f + "availability." + ("start_minute_utc" if "start" in name else "end_minute_utc")
            raise ValidationError(f"{field} must be in [0, {MINUTES_PER_DAY}) minutes after midnight UTC, "
                                  f"got {value}", field=field)
    return profile


def validate_name(name: str, field: str = "name", max_len: int = MAX_NAME_LEN) -> str:
    """1..max_len printable characters, no surrounding whitespace."""
    if not name or not name.strip():
        raise ValidationError(f"{field} must not be empty", field=field)
    if len(name) > max_len:
        raise ValidationError(f"{field} is {len(name)} characters long; the limit is {max_len}", field=field)
    if name != name.strip() or not _NAME_RE.match(name):
        raise ValidationError(f"{field} {excerpt(name)} has control characters or surrounding whitespace", field=field)
    return name


def validate_proposed_token(token: str) -> str:
    """A device-chosen token: 32 to 256 printable ASCII characters without spaces (its randomness is the device's
    responsibility; the length bound only rules out passwords)."""
    if not MIN_PROPOSED_TOKEN_LEN <= len(token) <= MAX_PROPOSED_TOKEN_LEN or not _TOKEN_RE.match(token):
        raise ValidationError(
            f"device_token for a new device must be {MIN_PROPOSED_TOKEN_LEN} to {MAX_PROPOSED_TOKEN_LEN} printable "
            f"ASCII characters without spaces; this one has {len(token)} characters",
            field="device_token", hint="generate it with a secure random source, e.g. secrets.token_urlsafe(32)")
    return token


def validate_device_id(device_id: str) -> str:
    if not device_id or len(device_id) > 64:
        raise ValidationError(f"device_id {device_id[:80]!r} is not a device id (as returned by Register)",
                              field="device_id")
    return device_id


def effective_state(stored: DeviceState, last_seen: datetime, stale_before: datetime) -> DeviceState:
    """Online devices not heard from since ``stale_before`` read as offline, even before the sweeper runs."""
    if stored is DeviceState.ONLINE and last_seen < stale_before:
        return DeviceState.OFFLINE
    return stored


def stale_cutoff(now: datetime, liveness_window_s: float) -> datetime:
    return now - timedelta(seconds=liveness_window_s)


def clamp_page_size(page_size: int) -> int:
    """0 -> default, > max -> max, negative -> ValidationError."""
    if page_size < 0:
        raise ValidationError(f"page_size must be >= 0, got {page_size}", field="page_size")
    return DEFAULT_PAGE_SIZE if page_size == 0 else min(page_size, MAX_PAGE_SIZE)


_TOKEN_PREFIX = "d1:"


def encode_page_token(last_device_id: str) -> str:
    """Opaque keyset cursor: the last device id of the page (results are ordered by id)."""
    return base64.urlsafe_b64encode((_TOKEN_PREFIX + last_device_id).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str | None:
    """The device id a page token continues after; None for the first page."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if not raw.startswith(_TOKEN_PREFIX) or len(raw) == len(_TOKEN_PREFIX):
        raise ValidationError("page_token is malformed; pass next_page_token from the previous reply unchanged",
                              field="page_token")
    return raw[len(_TOKEN_PREFIX):]
