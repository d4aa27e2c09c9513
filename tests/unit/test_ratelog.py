"""Rate-limited logging of events a client can cause at will (rejected uploads)."""

from __future__ import annotations

import logging

import pytest

from services.common.ratelog import RateLimitedLog


def test_repeats_within_the_interval_are_held_back_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelog"), interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="test.ratelog")
    assert limited.log("checksum", "rejected %s", "one")
    assert not limited.log("checksum", "rejected %s", "two")
    assert not limited.log("checksum", "rejected %s", "three")
    assert limited.log("late", "rejected %s", "late one")  # another reason is not held back
    now[0] += 10.0
    assert limited.log("checksum", "rejected %s", "four")
    assert [r.getMessage() for r in caplog.records] == [
        "rejected one", "rejected late one",
        "rejected four (and 2 more like it in the last 10 s, not logged)"]
