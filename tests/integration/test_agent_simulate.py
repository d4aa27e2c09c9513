"""`raffm agent simulate` (threads mode) against the real services: N agents with their own tier profiles and
their own Dirichlet non-IID data shares complete a round together."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edge_agent.simulate import add_arguments, plan_devices, run_threads
from raffm.v1 import aggregator_pb2
from services.registry.testing import ENROLL_KEY
from tests.integration.agentkit import Fleet, job, list_devices, rounds, tiny_model

TIERS = """
[tiers.phone]
memory_mb = 500
gflops = 5
up_mbps = 5
down_mbps = 20
share = 2

[tiers.laptop]
memory_mb = 2000
gflops = 50
up_mbps = 50
down_mbps = 200
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


def test_simulated_fleet_completes_a_round(tmp_path: Path, model: Path) -> None:
    fleet = Fleet(tmp_path, job(model, clients_per_round=3, quorum=3)).start()
    try:
        (tmp_path / "tiers.toml").write_text(TIERS)
        data = tmp_path / "reviews.jsonl"
        data.write_text("".join(json.dumps({"text": f"review {i}", "label": (i * 7) % 2}) + "\n" for i in range(60)))
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args([
            "--devices", "3", "--tiers", str(tmp_path / "tiers.toml"), "--data", str(data), "--alpha", "0.3",
            "--seed", "1", "--mode", "threads", "--state-root", str(tmp_path / "sim"), "--registry",
            fleet.registry.address, "--aggregator", fleet.aggregator.address, "--extractor", fleet.extractor.address,
            "--enroll-key", ENROLL_KEY, "--model", str(model), "--max-rounds", "1",
        ])
        devices = plan_devices(args)
        assert [c.name for c, _ in devices] == ["sim-phone-0", "sim-laptop-1", "sim-phone-2"]
        assert [c.memory_mb for c, _ in devices] == [500, 2000, 500]
        shares = [s for _, s in devices]
        assert sum(len(s) for s in shares) == 60
        assert len({tuple(s.texts) for s in shares}) == 3  # disjoint, different shares
        agents = run_threads(devices)
        assert [[o.status for o in a.outcomes] for a in agents] == [["uploaded"]] * 3
        assert len(list_devices(fleet)) == 3
        [rnd] = rounds(fleet)
        rnd = fleet.wait_round(fleet.agg_stub(), rnd.round_id)
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 3
    finally:
        fleet.stop()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_agents_stop_by_themselves_when_the_simulator_is_killed(tmp_path: Path, model: Path) -> None:
    """Issue 17: `raffm agent simulate` killed with SIGKILL (no chance to forward anything) leaves no orphan: every
    agent process notices its parent is gone, stops the way SIGTERM would, and exits."""
    import subprocess
    import sys
    import time

    import psutil

    fleet = Fleet(tmp_path, job(model, clients_per_round=2, quorum=2, local_steps=100000)).start()
    out = (tmp_path / "simulate.log").open("w")
    try:
        (tmp_path / "tiers.toml").write_text(TIERS)
        data = tmp_path / "reviews.jsonl"
        data.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n" for i in range(40)))
        sim = subprocess.Popen(
            [sys.executable, "-m", "raffm_app", "agent", "simulate", "--devices", "2", "--tiers",
             str(tmp_path / "tiers.toml"), "--data", str(data), "--state-root", str(tmp_path / "sim"),
             "--registry", fleet.registry.address, "--aggregator", fleet.aggregator.address,
             "--extractor", fleet.extractor.address, "--enroll-key", ENROLL_KEY, "--model", str(model)],
            stdout=out, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 300  # an upper bound for a slow, shared machine; nothing asserts on time
            while len(list_devices(fleet)) < 2:  # both agents run and have registered
                assert sim.poll() is None and time.monotonic() < end, (tmp_path / "simulate.log").read_text()
                time.sleep(0.2)
            agents = psutil.Process(sim.pid).children()
            assert len(agents) == 2
        finally:
            sim.kill()
            sim.wait()
        gone, alive = psutil.wait_procs(agents, timeout=300)
        for p in alive:
            p.kill()
        log_text = (tmp_path / "simulate.log").read_text()
        assert alive == [], log_text[-3000:]
        assert log_text.count(f"parent process {sim.pid} exited; stopping") == 2, log_text[-3000:]
        assert log_text.count("agent stopped (parent process exited)") == 2, log_text[-3000:]
    finally:
        out.close()
        fleet.stop()
