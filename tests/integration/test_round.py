"""A full federated round over real gRPC: registry, extractor and aggregator on port 0, three scripted devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from edge_agent.transfer import upload_once
from raffm.v1 import aggregator_pb2
from raffm.wire import WIRE_DTYPES
from tests.integration.fedloop import (
    Fleet, budgets_for, download, payload, plan_of, scripted_delta, spec_of, tiny_bert_folder, tiny_job,
)


def _expected(fleet: Fleet, version: str, updates: list[tuple[dict, object, int]], job) -> dict[str, torch.Tensor]:
    """What the job's strategy computes on the same deltas in the same order: its sliced FedAvg, then its next
    version."""
    from raffm.planning import cost_model_for

    store = fleet.store
    state = store.load(version)
    config = store.info(version).config
    strategy = job.method()
    agg = strategy.aggregator(state)
    for delta, spec, weight in updates:
        plan = plan_of(config, {n: tuple(t.shape) for n, t in state.items()}, spec)
        agg.fold(delta, {n: plan[n] for n in delta}, strategy.weight(weight), dtype=WIRE_DTYPES[job.wire_dtype])
    return strategy.next_version(agg.result(), cost_model_for(config), previous=state)[0]


@pytest.mark.parametrize("wire_dtype", ["fp32", "fp16"])
def test_three_heterogeneous_devices_complete_a_round(tmp_path: Path, wire_dtype: str) -> None:
    _three_device_round(tmp_path, wire_dtype)


@pytest.mark.postgres
def test_three_heterogeneous_devices_complete_a_round_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    _three_device_round(tmp_path, "bf16", db_url=postgres_url)


def _three_device_round(tmp_path: Path, wire_dtype: str, db_url: str = "") -> None:
    model = tiny_bert_folder(tmp_path / "model")
    job = tiny_job(model, wire_dtype=wire_dtype, rounds=2)
    evaluations = []

    def evaluator(state, config, prior):
        evaluations.append(len(state))
        return {"accuracy": 0.5, "loss": 1.0}

    fleet = Fleet(tmp_path, job, evaluator=evaluator, db_url=db_url).start()
    try:
        config = fleet.store.info("job-v0").config
        budgets = budgets_for(job, config)
        devs = [fleet.register(f"dev{i}", train_memory_mb=b, tier=tier)
                for i, (b, tier) in enumerate(zip(budgets, ("laptop", "jetson", "phone")))]
        stub = fleet.agg_stub()
        assignments = []
        for dev in devs:
            reply = fleet.poll(stub, dev)
            assert reply.WhichOneof("action") == "assignment", reply
            assignments.append(reply.assignment)
        specs = [spec_of(a) for a in assignments]
        assert len({s.key() for s in specs}) == 3, [s.key() for s in specs]  # heterogeneous slices
        assert all(a.round_id == "job-r1" and a.model_version == "job-v0" for a in assignments)
        # A fourth poll before uploading (its reply was lost, say) gets the same assignment again.
        again = fleet.poll(stub, devs[0])
        assert again.WhichOneof("action") == "assignment" and again.assignment.ticket == assignments[0].ticket

        updates = []
        down: dict[str, int] = {}
        up = 0
        for i, (dev, a, spec) in enumerate(zip(devs, assignments, specs)):
            received = download(fleet, dev, a)
            down[("laptop", "jetson", "phone")[i]] = sum(t.numel() * t.element_size() for t in received.values())
            delta = scripted_delta(received, seed=i, assignment=a)
            assert "bert.embeddings.word_embeddings.weight" in received  # frozen: downloaded, not uploaded
            assert received["bert.embeddings.word_embeddings.weight"].dtype == torch.float16  # as the device stores it
            assert "bert.embeddings.word_embeddings.weight" not in delta
            up += payload(delta, job.wire_dtype).nbytes
            assert received["classifier.weight"].dtype == WIRE_DTYPES[job.wire_dtype]
            ack = upload_once(stub, a.ticket, 10 * (i + 1), payload(delta, job.wire_dtype), metadata=dev.md,
                              metrics={"loss": 1.0 + i})
            assert ack.accepted and ack.round_id == "job-r1"
            updates.append((delta, spec, 10 * (i + 1)))
            if i == 0:  # it took part: polling again in this round waits, and never gets its ticket back
                assert fleet.poll(stub, dev).WhichOneof("action") == "wait"

        rnd = fleet.wait_round(stub, "job-r1")
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED, rnd
        assert rnd.result_model_version == "job-v1" and rnd.accepted == 3 and rnd.assigned == 3
        # Bytes: the slices the three participants downloaded and the deltas they uploaded, against what full-model
        # FedAvg would have moved for the same three participants (the whole model down and up, same wire dtype).
        full_model = sum(t.numel() for t in fleet.store.load("job-v0").values()) * WIRE_DTYPES[job.wire_dtype].itemsize
        assert rnd.bytes_down == sum(down.values()) and rnd.bytes_up == up
        assert rnd.full_model_bytes == 3 * 2 * full_model > rnd.bytes_up + rnd.bytes_down
        assert rnd.evaluation["accuracy"] == 0.5 and evaluations
        assert rnd.mean_train_loss == pytest.approx((1 * 10 + 2 * 20 + 3 * 30) / 60)

        expected = _expected(fleet, "job-v0", updates, job)
        got = fleet.store.load("job-v1")
        assert set(got) == set(expected)
        for name in expected:
            assert torch.equal(got[name], expected[name]), name

        job_msg = stub.GetJob(aggregator_pb2.GetJobRequest(), metadata=fleet.operator, timeout=10)
        assert job_msg.model_version == "job-v1" and job_msg.current_round == 2
        # the job as devices are told it: the same task and hyper-parameters as an assignment (its seed: the job's)
        assigned = fleet.poll(stub, fleet.devices[next(iter(fleet.devices))]).assignment
        assert job_msg.task == assigned.task and job_msg.task.kind == aggregator_pb2.TASK_KIND_TEXT_CLASSIFICATION
        assert job_msg.hparams == aggregator_pb2.HyperParams(**{
            **{f.name: v for f, v in assigned.hparams.ListFields()}, "seed": job.seed})
        listed = stub.ListRounds(aggregator_pb2.ListRoundsRequest(), metadata=fleet.operator, timeout=10)
        assert [r.round_id for r in listed.rounds] == ["job-r2", "job-r1"]
        text = _metrics_text(fleet)
        assert 'raffm_aggregator_updates_accepted_total{tier="phone"} 1.0' in text
        assert "raffm_aggregator_assignments_redelivered_total 1.0" in text
        dtype = WIRE_DTYPES[job.wire_dtype]
        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
        assert f'raffm_aggregator_full_model_fedavg_bytes_total{{wire_dtype="{name}"}} {float(6 * full_model)}' in text
        for tier, nbytes in down.items():
            assert f'raffm_aggregator_download_bytes_total{{tier="{tier}",wire_dtype="{name}"}} {float(nbytes)}' in text
            streamed = generate_latest(fleet.extractor.server.registry).decode()
            assert f'raffm_extractor_download_bytes_total{{tier="{tier}",wire_dtype="{name}"}} {float(nbytes)}' in streamed
    finally:
        fleet.stop()


def _metrics_text(fleet: Fleet) -> str:
    return generate_latest(fleet.metrics).decode()


def test_server_momentum_carries_over_rounds_and_restarts(tmp_path: Path) -> None:
    """FedAvgM as a job option: version 2 is version 1 plus round 2's mean step plus half of round 1's, also when the
    aggregator restarts between the rounds (the momentum is stored beside the version)."""
    model = tiny_bert_folder(tmp_path / "model")
    job = tiny_job(model, rounds=3, clients_per_round=1, quorum=1, strategy_options={"server_momentum": 0.5})
    fleet = Fleet(tmp_path, job).start()
    try:
        dev = fleet.register("dev", train_memory_mb=1 << 16, tier="server")  # trains the whole model
        deltas = []
        for r in (1, 2):
            if r == 2:  # a restart between the rounds
                fleet.stop_aggregator()
                fleet.metrics = CollectorRegistry()
                fleet.start_aggregator()
            stub = fleet.agg_stub()
            a = fleet.poll(stub, dev).assignment
            deltas.append(scripted_delta(download(fleet, dev, a), seed=r, assignment=a))
            assert upload_once(stub, a.ticket, 8, payload(deltas[-1], job.wire_dtype), metadata=dev.md).accepted
            assert fleet.wait_round(stub, f"job-r{r}").state == aggregator_pb2.ROUND_STATE_CLOSED
        v0, v1, v2 = (fleet.store.load(f"job-v{i}") for i in range(3))
        for name, d1 in deltas[0].items():
            d2 = deltas[1][name]
            torch.testing.assert_close(v1[name], v0[name] + d1.float())  # round 1: plain FedAvg
            momentum = v1[name].double() - v0[name].double()
            torch.testing.assert_close(v2[name], (v1[name].double() + d2.double() + 0.5 * momentum).float())
        frozen = "bert.embeddings.word_embeddings.weight"
        assert frozen not in deltas[0] and torch.equal(v2[frozen], v0[frozen])  # never trained, never moved
    finally:
        fleet.stop()
