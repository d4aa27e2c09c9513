"""Registry domain rules: validation, liveness, pagination tokens."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from raffm.errors import ValidationError
from raffm.profile import TIERS, DeviceProfile
from services.registry.domain import (
    MAX_MEMORY_MB, DeviceState, clamp_page_size, decode_page_token, effective_state, encode_page_token, validate_name,
    validate_profile,
)

GOOD = DeviceProfile(train_memory_mb=2048, infer_memory_mb=0, gflops=10.0, up_mbps=5.0, down_mbps=20.0, tier="phone")


def test_good_profile_passes_unchanged():
    assert validate_profile(GOOD) is GOOD
    full = replace(GOOD, battery_pct=0.0, window_start_min=1380, window_end_min=360)  # wraps midnight
    assert validate_profile(full) is full


@pytest.mark.parametrize("change, field", [
    ({"train_memory_mb": 0}, "profile.train_memory_mb"),
    ({"train_memory_mb": MAX_MEMORY_MB + 1}, "profile.train_memory_mb"),
    ({"infer_memory_mb": -1}, "profile.infer_memory_mb"),
    ({"gflops": math.nan}, "profile.gflops"),
    ({"gflops": -math.inf}, "profile.gflops"),
    ({"up_mbps": 0.0}, "profile.up_mbps"),
    ({"down_mbps": 2e6}, "profile.down_mbps"),
    ({"tier": "Phone"}, "profile.tier"),
    ({"battery_pct": -0.1}, "profile.battery_pct"),
    ({"window_start_min": 10}, "profile.availability"),
    ({"window_start_min": 10, "window_end_min": 1440}, "profile.availability.end_minute_utc"),
])
def test_bad_profiles_name_the_field(change, field):
    with pytest.raises(ValidationError) as err:
        validate_profile(replace(GOOD, **change))
    assert err.value.field == field and field.split(".")[-1] in str(err.value)


def test_unknown_tier_message_lists_the_known_ones():
    with pytest.raises(ValidationError) as err:
        validate_profile(replace(GOOD, tier="toaster"))
    assert all(t in str(err.value) for t in TIERS)


@pytest.mark.parametrize("name", ["", " ", " lead", "trail ", "tab\tname", "x" * 129])
def test_bad_names(name):
    with pytest.raises(ValidationError):
        validate_name(name)


@pytest.mark.parametrize("name", ["a", "x" * 128, "Pi 4 — kitchen", "jetson/02:ab"])
def test_good_names(name):
    assert validate_name(name) == name


def test_effective_state_only_ages_online_devices():
    now = datetime(2026, 11, 25, tzinfo=timezone.utc)
    cutoff = now - timedelta(seconds=60)
    old, fresh = now - timedelta(seconds=61), now - timedelta(seconds=59)
    assert effective_state(DeviceState.ONLINE, old, cutoff) is DeviceState.OFFLINE
    assert effective_state(DeviceState.ONLINE, fresh, cutoff) is DeviceState.ONLINE
    assert effective_state(DeviceState.DEREGISTERED, old, cutoff) is DeviceState.DEREGISTERED
    assert effective_state(DeviceState.OFFLINE, fresh, cutoff) is DeviceState.OFFLINE


@given(st.text(min_size=1, max_size=64))
def test_page_tokens_round_trip(device_id):
    assert decode_page_token(encode_page_token(device_id)) == device_id


@pytest.mark.parametrize("token", ["garbage!", "ZDE6", "eDox", "%%%"])
def test_malformed_page_tokens_are_rejected(token):
    with pytest.raises(ValidationError) as err:
        decode_page_token(token)
    assert err.value.field == "page_token"


def test_page_size_bounds():
    assert clamp_page_size(0) == 100 and clamp_page_size(7) == 7 and clamp_page_size(10**6) == 1000
    with pytest.raises(ValidationError):
        clamp_page_size(-1)
