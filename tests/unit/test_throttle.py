"""Emulated slowness for simulated lying fleets (edge_agent.throttle) and the tiers that declare it."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.simulate import Tier, load_tiers, tiers_toml
from edge_agent.throttle import Pace


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def test_pace_holds_work_to_its_rate_and_never_adds_to_slower_work() -> None:
    clock = FakeClock()
    pace = Pace(10.0, wait=clock.wait, clock=clock)
    pace.done(5)  # 5 units at 10/s: due at +0.5 s
    assert clock.waits == [pytest.approx(0.5)]
    clock.now += 2.0  # the next 5 units took 2 s by themselves: already slower than the rate
    pace.done(5)
    assert len(clock.waits) == 1
    assert pace.elapsed == pytest.approx(2.5)


def test_an_unlimited_pace_never_waits() -> None:
    clock = FakeClock()
    pace = Pace(0.0, wait=clock.wait, clock=clock)
    pace.done(1e12)
    assert clock.waits == []
    with pytest.raises(ValueError, match="rate"):
        Pace(-1.0)


def test_tiers_declare_a_true_speed_and_link(tmp_path: Path) -> None:
    path = tmp_path / "tiers.toml"
    path.write_text("""
[tiers.liar]
memory_mb = 500
gflops = 30
up_mbps = 10
down_mbps = 40
true_gflops = 10
true_up_mbps = 2.5
tier = "phone"

[tiers.honest]
memory_mb = 1000
gflops = 20
up_mbps = 10
down_mbps = 40
""")
    liar, honest = load_tiers(path)
    assert (liar.true_gflops, liar.true_up_mbps, liar.true_down_mbps) == (10.0, 2.5, 0.0)
    assert (honest.true_gflops, honest.true_up_mbps) == (0.0, 0.0)
    path.write_text(tiers_toml([liar, honest]))
    assert load_tiers(path) == [liar, honest]
    path.write_text(tiers_toml([Tier("bad", 100, 1.0, 1.0, 1.0, true_gflops=-1.0)]).replace("true_gflops = -1",
                                                                                            "true_gflops = -1"))
    with pytest.raises(ValueError, match="true_gflops"):
        load_tiers(path)
