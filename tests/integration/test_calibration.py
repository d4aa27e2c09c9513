"""Closed-loop sizing over real gRPC and real SQLite: devices that lie about their compute get corrected slices.

Two scripted devices declare the same profile; one is really four times faster than it says, the other four times
slower. Each reports, with its upload, the training time its true speed gives. After a few rounds (and an aggregator
restart: the calibration is rebuilt from the reports stored with the assignments), the fast one trains a larger slice
than in round 1 and the slow one a smaller one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent.transfer import upload_once
from raffm.fitting import ladder
from raffm.planning import cost_model_for
from raffm.v1 import aggregator_pb2
from services.aggregator.store import SqlRoundStore
from tests.integration.fedloop import Fleet, download, payload, scripted_delta, spec_of, tiny_bert_folder, tiny_job

TRUTH = {"under": 4.0, "over": 0.25}  # true GFLOP/s over declared
DEADLINE_S = 100.0


def _declared_gflops(job, config) -> float:
    """A declared speed at which the deadline (not memory) picks a middle rung of the ladder, with room for a 4x
    correction either way."""
    cm = cost_model_for(config)
    strategy = job.method()
    samples = job.local_steps * job.batch_size
    seconds = []  # compute seconds at 1 GFLOP/s of each rung, with the recipe the strategy trains it with
    for spec in ladder(cm.dims):
        recipe = strategy.recipes_for(spec, cm)[0]
        costs = cm.estimate(spec, batch_size=job.batch_size, seq_len=job.seq_len, wire_dtype=job.wire_dtype,
                            recipe=recipe)
        seconds.append(samples * costs.flops_per_sample / 1e9)
    # between the thresholds of the middle rung and the next: 4x slower fits a lower rung, 4x faster a higher one
    mid = len(seconds) // 2
    g = math.sqrt(seconds[mid] * seconds[mid + 1]) / (0.8 * DEADLINE_S)
    assert seconds[0] / DEADLINE_S < g / 4 and g * 4 > seconds[mid + 1] / (0.8 * DEADLINE_S), seconds
    return g


def _params(config, spec) -> int:
    return cost_model_for(config).params(spec)


def test_under_declarers_get_larger_slices_and_over_declarers_smaller(tmp_path: Path) -> None:
    model = tiny_bert_folder(tmp_path / "model", num_attention_heads=8, hidden_size=64, intermediate_size=256)
    job = tiny_job(model, rounds=4, clients_per_round=2, quorum=2, round_deadline_s=DEADLINE_S, local_steps=2)
    fleet = Fleet(tmp_path, job).start()
    try:
        config = fleet.store.info("job-v0").config
        gflops = _declared_gflops(job, config)
        devs = {name: fleet.register(name, train_memory_mb=1 << 14, gflops=gflops, up_mbps=1e4, down_mbps=1e4,
                                     tier="laptop") for name in TRUTH}
        params: dict[str, list[int]] = {name: [] for name in TRUTH}
        for r in (1, 2, 3):
            if r == 3:  # a restart: the calibration comes back from the reports in SQL
                fleet.stop_aggregator()
                fleet.metrics = CollectorRegistry()
                fleet.start_aggregator()
            stub = fleet.agg_stub()
            given = {}
            for name, dev in devs.items():  # both poll first: the same time left
                reply = fleet.poll(stub, dev)
                assert reply.WhichOneof("action") == "assignment", reply
                given[name] = reply.assignment
            for name, dev in devs.items():
                a = given[name]
                params[name].append(_params(config, spec_of(a)))
                received = download(fleet, dev, a)
                delta = scripted_delta(received, seed=r, assignment=a)
                samples = job.local_steps * job.batch_size
                # what the device's true speed makes of the work it was given
                seconds = samples * a.predicted.flops_per_sample / (TRUTH[name] * gflops * 1e9)
                metrics = {"loss": 1.0, "steps": job.local_steps, "seconds": seconds,
                           "step_seconds": seconds / job.local_steps, "samples": samples,
                           "peak_memory_mb": 0.9 * a.predicted.train_memory_mb, "download_mbps": 1e4,
                           "download_seconds": 0.01}
                ack = upload_once(stub, a.ticket, samples, payload(delta, job.wire_dtype), metadata=dev.md,
                                  metrics=metrics)
                assert ack.accepted, ack
            assert fleet.wait_round(stub, f"job-r{r}").state == aggregator_pb2.ROUND_STATE_CLOSED

        assert params["under"][2] > params["under"][0], params
        assert params["over"][2] < params["over"][0], params

        # The reports are stored with the assignments; the metrics carry tiers, never devices.
        store = SqlRoundStore(f"sqlite:///{tmp_path / 'agg' / 'aggregator.db'}")
        try:
            stored = [a for r in (1, 2, 3) for a in store.assignments(f"job-r{r}")]
        finally:
            store.close()
        assert len(stored) == 6 and all(a.report and a.predicted for a in stored)
        slow = [a for a in stored if a.device_id == devs["over"].device_id]
        assert all(a.report["samples"] == 128 and a.predicted["declared_gflops"] == pytest.approx(gflops)
                   for a in slow)
        assert slow[-1].predicted["calibration_compute"] == pytest.approx(4.0, rel=1e-3)  # decays a hair
        text = generate_latest(fleet.metrics).decode()
        assert 'raffm_aggregator_measured_over_predicted_count{quantity="compute",tier="laptop"}' in text
        assert devs["over"].device_id not in text
    finally:
        fleet.stop()


def test_a_device_that_cannot_finish_in_time_is_not_assigned(tmp_path: Path) -> None:
    model = tiny_bert_folder(tmp_path / "model")
    job = tiny_job(model, rounds=2, clients_per_round=1, quorum=1, round_deadline_s=30.0)
    fleet = Fleet(tmp_path, job).start()
    try:
        dev = fleet.register("snail", train_memory_mb=1 << 14, gflops=1e-6, up_mbps=1e4, down_mbps=1e4,
                             tier="phone")
        reply = fleet.poll(fleet.agg_stub(), dev)
        assert reply.WhichOneof("action") == "wait"
        assert "deadline" in reply.wait.reason, reply.wait.reason
        text = generate_latest(fleet.metrics).decode()
        assert 'raffm_aggregator_unfit_polls_total{reason="deadline",tier="phone"} 1.0' in text
    finally:
        fleet.stop()


def test_a_real_agent_reports_what_its_round_cost(tmp_path: Path) -> None:
    """The edge agent (throttled to a true speed and links below what it declares, as `raffm agent simulate` tiers
    can ask) reports its step time, samples and throughputs with its upload; they land in the assignment's row."""
    from tests.integration.agentkit import AgentThread, agent_config, job, tiny_model

    model = tiny_model(tmp_path / "model")
    fleet = Fleet(tmp_path, job(model)).start()
    try:
        config = agent_config(fleet, "liar", tmp_path / "state", model, true_gflops=50.0, true_up_mbps=50.0,
                              true_down_mbps=50.0)
        runner = AgentThread(config).start()
        assert runner.join() == 0
        [outcome] = runner.agent.outcomes
        assert outcome.status == "uploaded", outcome
        store = SqlRoundStore(f"sqlite:///{tmp_path / 'agg' / 'aggregator.db'}")
        try:
            [a] = store.assignments("job-r1")
        finally:
            store.close()
        r = a.report
        assert r["samples"] == outcome.samples > 0 and r["steps"] >= 1
        assert r["step_seconds"] == pytest.approx(r["seconds"] / r["steps"])
        assert r["download_seconds"] > 0 and r["download_mbps"] > 0 and r["download_bytes"] > 0
        assert r["upload_seconds"] > 0 and r["upload_mbps"] > 0 and r["upload_bytes"] > 0
        assert r["peak_memory_mb"] == pytest.approx(outcome.peak_memory_mb)
        assert r["round_seconds"] >= r["seconds"]
        assert a.predicted["declared_gflops"] == 100.0 and a.predicted["planned_steps"] == 2
    finally:
        fleet.stop()


@pytest.mark.parametrize("grace_s", [60.0, 0.0], ids=["late", "ticket-expired"])
def test_a_late_device_is_refused_but_its_report_still_calibrates_it(tmp_path: Path, grace_s: float) -> None:
    """A device that misses the deadline would never be corrected if its report were thrown away with its update,
    also when it is so late that its ticket has expired."""
    model = tiny_bert_folder(tmp_path / "model")
    job = tiny_job(model, rounds=3, clients_per_round=1, quorum=1, round_deadline_s=5.0, on_deadline="fail",
                   ticket_grace_s=grace_s)
    fleet = Fleet(tmp_path, job).start()
    try:
        dev = fleet.register("late", train_memory_mb=1 << 14, gflops=50.0, up_mbps=1e4, down_mbps=1e4, tier="sbc")
        stub = fleet.agg_stub()
        a = fleet.poll(stub, dev).assignment
        delta = scripted_delta(download(fleet, dev, a), seed=1, assignment=a)
        r1 = fleet.wait_round(stub, a.round_id, states=(aggregator_pb2.ROUND_STATE_FAILED,))
        assert r1.state == aggregator_pb2.ROUND_STATE_FAILED
        samples = job.local_steps * job.batch_size
        seconds = 4 * samples * a.predicted.flops_per_sample / (50.0 * 1e9)  # four times slower than declared
        with pytest.raises(Exception) as refused:
            upload_once(stub, a.ticket, samples, payload(delta, job.wire_dtype), metadata=dev.md,
                        metrics={"seconds": seconds, "steps": job.local_steps, "samples": samples})
        assert ("FAILED_PRECONDITION" if grace_s else "UNAUTHENTICATED") in str(refused.value)
        store = SqlRoundStore(f"sqlite:///{tmp_path / 'agg' / 'aggregator.db'}")
        try:
            [stored] = store.assignments(a.round_id)
        finally:
            store.close()
        assert stored.report["late"] == 1.0 and stored.report["samples"] == samples
        nxt = None
        for _ in range(200):  # the next round opens once the failed one is finished
            reply = fleet.poll(stub, dev)
            if reply.WhichOneof("action") == "assignment":
                nxt = reply.assignment
                break
        assert nxt is not None and nxt.round_id != a.round_id
        store = SqlRoundStore(f"sqlite:///{tmp_path / 'agg' / 'aggregator.db'}")
        try:
            [planned] = store.assignments(nxt.round_id)
        finally:
            store.close()
        assert planned.predicted["calibration_compute"] == pytest.approx(2.0, rel=1e-3)  # one round: half-way
    finally:
        fleet.stop()
