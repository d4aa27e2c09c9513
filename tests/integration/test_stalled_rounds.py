"""Issue 12, item 5 (the aggregator's half): when every assignment of a round has ended and no other online device
can take part, no progress is possible. The round is then aggregated (enough updates) or failed (too few) at once,
not at its deadline after extensions, and it records why its devices gave up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_agent.transfer import upload_once
from raffm.v1 import aggregator_pb2, registry_pb2
from tests.integration.fedloop import Fleet, download, payload, scripted_delta, tiny_bert_folder, tiny_job

DATA = aggregator_pb2.FAILURE_REASON_DATA
WHY = "the local data has 3 labels; the job's model has 2"


@pytest.fixture()
def fleet(tmp_path: Path):
    # Deadline and extensions far beyond any test: only the early settlement can finish a round here.
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=2, min_updates=1, rounds=3,
                   round_deadline_s=3600.0, max_extensions=3)
    f = Fleet(tmp_path, job).start()
    for name in ("a", "b"):
        f.register(name, train_memory_mb=64, tier="laptop")
    yield f
    f.stop()


def _fail(fleet: Fleet, name: str, a: Any, detail: str = WHY) -> None:
    fleet.agg_stub().ReportFailure(aggregator_pb2.ReportFailureRequest(ticket=a.ticket, reason=DATA, detail=detail),
                                   metadata=fleet.devices[name].md, timeout=10)


def _round(fleet: Fleet, round_id: str) -> aggregator_pb2.Round:
    return fleet.agg_stub().GetRound(aggregator_pb2.GetRoundRequest(round_id=round_id), metadata=fleet.operator,
                                     timeout=10)


def test_a_round_whose_every_device_failed_fails_at_once_with_their_reason(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    a, b = (fleet.poll(stub, fleet.devices[n]).assignment for n in ("a", "b"))
    _fail(fleet, "a", a)
    assert _round(fleet, a.round_id).state == aggregator_pb2.ROUND_STATE_OPEN  # b may still deliver
    _fail(fleet, "b", b, detail="x" * 5000)
    rnd = _round(fleet, a.round_id)
    assert rnd.state == aggregator_pb2.ROUND_STATE_FAILED and rnd.dropped == 2, rnd
    [failures] = rnd.failures
    assert (failures.reason, failures.devices) == ("data", 2) and 0 < len(failures.detail) <= 300
    # The job moves on: the next round is open and the devices get assignments in it.
    assert fleet.poll(stub, fleet.devices["a"]).assignment.round_index == 2


def test_a_round_is_aggregated_at_once_when_the_devices_left_have_all_failed(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    a, b = (fleet.poll(stub, fleet.devices[n]).assignment for n in ("a", "b"))
    delta = scripted_delta(download(fleet, fleet.devices["a"], a), seed=1, assignment=a)
    assert upload_once(stub, a.ticket, 5, payload(delta, "fp32"), metadata=fleet.devices["a"].md).accepted
    assert _round(fleet, a.round_id).state == aggregator_pb2.ROUND_STATE_OPEN  # quorum 2: b is still working
    _fail(fleet, "b", b)
    rnd = fleet.wait_round(stub, a.round_id, timeout=120)
    assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 1 and rnd.dropped == 1, rnd
    assert [(f.reason, f.devices, f.detail) for f in rnd.failures] == [("data", 1, WHY)]


def test_a_round_waits_while_another_online_device_may_still_take_part(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    fleet.register("c", train_memory_mb=64, tier="laptop")  # online, has not polled yet
    a = fleet.poll(stub, fleet.devices["a"]).assignment
    _fail(fleet, "a", a)
    assert _round(fleet, a.round_id).state == aggregator_pb2.ROUND_STATE_OPEN
    c = fleet.poll(stub, fleet.devices["c"]).assignment
    assert c.round_id == a.round_id
    b = fleet.poll(stub, fleet.devices["b"]).assignment
    _fail(fleet, "c", c)
    _fail(fleet, "b", b)
    assert _round(fleet, a.round_id).state == aggregator_pb2.ROUND_STATE_FAILED


def test_a_device_no_sub_model_fits_does_not_keep_a_round_waiting(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    tiny = fleet.register("tiny", train_memory_mb=1, tier="phone")
    a, b = (fleet.poll(stub, fleet.devices[n]).assignment for n in ("a", "b"))
    _fail(fleet, "a", a)
    _fail(fleet, "b", b)
    # (the round is full until a and b failed; now "tiny" polls and fits nothing: nobody is left)
    reply = fleet.poll(stub, tiny)
    assert reply.WhichOneof("action") == "wait" and "no sub-model fits" in reply.wait.reason
    assert _round(fleet, a.round_id).state == aggregator_pb2.ROUND_STATE_FAILED


def test_a_round_no_online_device_fits_fails_once_each_has_polled(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    for name in ("a", "b"):  # deregistered: only the two tiny devices below are online
        dev = fleet.devices[name]
        fleet.registry.stub.Deregister(registry_pb2.DeregisterRequest(device_id=dev.device_id), metadata=dev.md,
                                       timeout=10)
    tiny = [fleet.register(f"tiny{i}", train_memory_mb=1, tier="phone") for i in range(2)]
    first = fleet.poll(stub, tiny[0])
    assert first.WhichOneof("action") == "wait" and "no sub-model fits" in first.wait.reason
    [rnd] = stub.ListRounds(aggregator_pb2.ListRoundsRequest(), metadata=fleet.operator, timeout=10).rounds
    assert rnd.state == aggregator_pb2.ROUND_STATE_OPEN  # the other one may fit
    fleet.poll(stub, tiny[1])
    rnd = _round(fleet, rnd.round_id)
    assert rnd.state == aggregator_pb2.ROUND_STATE_FAILED and rnd.assigned == 0, rnd
    assert [(f.reason, f.devices) for f in rnd.failures] == [("no_fit", 2)]
    assert "no sub-model fits" in rnd.failures[0].detail


def test_a_round_with_too_few_updates_waits_for_devices_that_come_online_later(tmp_path: Path) -> None:
    """At a job's start the fleet registers over seconds: the first device may finish while it is the only one
    online. Its update is kept and the round waits (its deadline decides), rather than failing at once."""
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=2, min_updates=2, rounds=1,
                   round_deadline_s=3600.0)
    fleet = Fleet(tmp_path, job).start()
    try:
        stub = fleet.agg_stub()
        for name in ("a", "b"):  # b registers only once a has uploaded
            dev = fleet.register(name, train_memory_mb=64, tier="laptop")
            a = fleet.poll(stub, dev).assignment
            delta = scripted_delta(download(fleet, dev, a), seed=1, assignment=a)
            assert upload_once(stub, a.ticket, 5, payload(delta, "fp32"), metadata=dev.md).accepted
            if name == "a":
                assert _round(fleet, a.round_id).state == aggregator_pb2.ROUND_STATE_OPEN
        rnd = fleet.wait_round(stub, a.round_id, timeout=120)
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 2, rnd
    finally:
        fleet.stop()
