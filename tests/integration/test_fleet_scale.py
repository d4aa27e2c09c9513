"""`raffm agent simulate` for large fleets against the real services: the control-plane mode (tiny synthetic shares,
one torch thread) with agents as threads and as Ray actors (a local Ray instance), a round closing with every
assigned device uploading, and the per-call latencies every agent observed."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.fleet import LatencyRecorder, run_threads_report
from edge_agent.simulate import add_arguments, main, plan_devices
from raffm.v1 import aggregator_pb2
from services.registry.testing import ENROLL_KEY
from tests.conftest import skip_or_fail
from tests.integration.agentkit import Fleet, job, list_devices, rounds, tiny_model

TIERS = """
[tiers.phone]
memory_mb = 500
gflops = 5
up_mbps = 5
down_mbps = 20
share = 3

[tiers.laptop]
memory_mb = 2000
gflops = 50
up_mbps = 50
down_mbps = 200
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


def _args(fleet: Fleet, tmp_path: Path, model: Path, devices: int, *extra: str) -> argparse.Namespace:
    (tmp_path / "tiers.toml").write_text(TIERS)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([
        "--devices", str(devices), "--tiers", str(tmp_path / "tiers.toml"), "--control-plane",
        "--state-root", str(tmp_path / "sim"), "--registry", fleet.registry.address,
        "--aggregator", fleet.aggregator.address, "--extractor", fleet.extractor.address, "--enroll-key", ENROLL_KEY,
        "--model", str(model), "--max-rounds", "1", *extra])


def _closed_then(fleet: Fleet, stop: threading.Event, linger_s: float = 1.5) -> threading.Thread:
    """Set ``stop`` a little after the first round closed (so the fleet is seen polling and heartbeating)."""

    def watch() -> None:
        while not stop.is_set():
            listed = rounds(fleet)
            if listed and listed[0].state == aggregator_pb2.ROUND_STATE_CLOSED:
                stop.wait(linger_s)
                stop.set()
                return
            stop.wait(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_latency_recorder_percentiles() -> None:
    rec = LatencyRecorder()
    for ms in range(1, 101):
        rec("aggregator.PollRound", ms / 1000, True)
    rec("aggregator.PollRound", 5.0, False)
    row = rec.summary()["aggregator.PollRound"]
    assert row["count"] == 100 and row["errors"] == 1
    assert row["p50_ms"] == pytest.approx(50) and row["p99_ms"] == pytest.approx(99) and row["max_ms"] == 100


def test_control_plane_fleet_of_threads_registers_polls_and_closes_a_round(tmp_path: Path, model: Path) -> None:
    fleet = Fleet(tmp_path, job(model, clients_per_round=10, quorum=10, local_steps=1, batch_size=2, seq_len=8,
                                poll_wait_s=0.3), liveness_window_s=3.0).start()
    try:
        devices = plan_devices(_args(fleet, tmp_path, model, 40, "--mode", "threads"))
        assert len(devices) == 40 and all(c.threads == 1 and len(s) == 8 for c, s in devices)
        stop = threading.Event()
        _closed_then(fleet, stop)
        report = run_threads_report(devices, duration_s=240, start_spread_s=1.0, stop=stop, control_plane=True)
        assert report.registered == 40 and len(list_devices(fleet)) == 40
        assert report.outcome_counts() == {"uploaded": 10}, report.to_dict()
        [rnd] = rounds(fleet)
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 10
        latency = report.latency
        assert latency["registry.Register"]["count"] == 40
        assert latency["aggregator.PollRound"]["count"] >= 40 and latency["registry.Heartbeat"]["count"] > 0
        assert 0 < latency["aggregator.PollRound"]["p50_ms"] <= latency["aggregator.PollRound"]["p99_ms"]
    finally:
        fleet.stop()


@pytest.mark.slow
def test_control_plane_fleet_on_ray_actors(tmp_path: Path, model: Path, capsys: Any) -> None:
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        skip_or_fail("ray", f"ray is not installed ({exc}); the test extra installs it")
    fleet = Fleet(tmp_path, job(model, clients_per_round=4, quorum=4, local_steps=1, batch_size=2, seq_len=8,
                                poll_wait_s=0.3)).start()
    try:
        stats = tmp_path / "stats.json"
        args = _args(fleet, tmp_path, model, 8, "--mode", "ray", "--ray-actors", "2", "--duration-s", "20",
                     "--stats-json", str(stats))
        assert main(args) == 0
        report = json.loads(stats.read_text())
        assert report["devices"] == 8 and report["registered"] == 8
        assert report["outcomes"] == {"uploaded": 4}, report
        assert report["latency_ms"]["aggregator.PollRound"]["count"] > 8
        [rnd] = rounds(fleet)
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 4
        assert "8/8 devices registered" in capsys.readouterr().out
    finally:
        fleet.stop()
