"""Issue 12, item 1: two UploadUpdate streams on one ticket. One stream owns the ticket's staging until it ends; a
second one gets ABORTED (or ALREADY_EXISTS once the first was accepted), never INTERNAL, and what is folded is exactly
the bytes of the acknowledged stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from edge_agent.transfer import upload_messages
from raffm.v1 import aggregator_pb2
from tests.integration.fedloop import Fleet, download, payload, scripted_delta, tiny_bert_folder, tiny_job
from tests.integration.test_round import _expected, spec_of

CHUNK = 1024


@pytest.fixture()
def fleet(tmp_path: Path):
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=1, quorum=1, rounds=1)
    f = Fleet(tmp_path, job).start()
    f.register("a", train_memory_mb=64, tier="laptop")
    yield f
    f.stop()


def _assignment_and_deltas(fleet: Fleet) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    a = fleet.poll(fleet.agg_stub(), fleet.devices["a"]).assignment
    received = download(fleet, fleet.devices["a"], a)
    return a, scripted_delta(received, seed=1, assignment=a), scripted_delta(received, seed=2, assignment=a)


def _assert_folded_exactly(fleet: Fleet, a: Any, delta: dict[str, torch.Tensor]) -> None:
    rnd = fleet.wait_round(fleet.agg_stub(), a.round_id)
    assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 1, rnd
    expected = _expected(fleet, "job-v0", [(delta, spec_of(a), 5)], fleet.job)
    got = fleet.store.load("job-v1")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_a_second_stream_on_a_ticket_in_flight_is_aborted_and_only_the_first_is_folded(fleet: Fleet) -> None:
    stub, dev = fleet.agg_stub(), fleet.devices["a"]
    a, first, second = _assignment_and_deltas(fleet)
    release = threading.Event()

    def held(msgs: list[aggregator_pb2.UploadMessage]) -> Iterator[aggregator_pb2.UploadMessage]:
        for i, m in enumerate(msgs):
            if i == 6:  # header, manifest and 4 chunks are in; the rest waits for the other streams
                release.wait(60)
            yield m

    msgs = list(upload_messages(a.ticket, 5, payload(first, "fp32"), chunk_bytes=CHUNK))
    call = stub.UploadUpdate.future(held(msgs), metadata=dev.md, timeout=120)
    query = aggregator_pb2.QueryUploadRequest(ticket=a.ticket)
    for _ in range(600):
        if stub.QueryUpload(query, metadata=dev.md, timeout=10).bytes_received >= 4 * CHUNK:
            break
        time.sleep(0.05)
    else:
        release.set()
        raise AssertionError("the first stream never got its chunks in")

    # Different data, then an identical retry: both while the first stream is in flight.
    for delta in (second, first):
        with pytest.raises(grpc.RpcError) as err:
            stub.UploadUpdate(iter(upload_messages(a.ticket, 5, payload(delta, "fp32"), chunk_bytes=CHUNK)),
                              metadata=dev.md, timeout=60)
        assert err.value.code() == grpc.StatusCode.ABORTED, err.value.details()
        assert "in progress" in err.value.details()

    release.set()
    ack = call.result(timeout=120)
    assert ack.accepted and ack.bytes_received == payload(first, "fp32").nbytes
    with pytest.raises(grpc.RpcError) as err:  # once accepted, the ticket is done
        stub.UploadUpdate(iter(upload_messages(a.ticket, 5, payload(second, "fp32"), chunk_bytes=CHUNK)),
                          metadata=dev.md, timeout=60)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    _assert_folded_exactly(fleet, a, first)
    rnd = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id=a.round_id), metadata=fleet.operator, timeout=10)
    assert rnd.rejected == 3  # the two refused streams and the one after the acceptance, each counted once


def test_two_streams_racing_on_one_ticket_fold_exactly_the_acknowledged_one(fleet: Fleet) -> None:
    """Free-running race: whichever stream wins, the other gets a clear status and the fold is the winner's bytes."""
    stub, dev = fleet.agg_stub(), fleet.devices["a"]
    a, first, second = _assignment_and_deltas(fleet)
    start = threading.Barrier(2)
    outcomes: dict[int, Any] = {}

    def send(i: int, delta: dict[str, torch.Tensor]) -> None:
        msgs = list(upload_messages(a.ticket, 5, payload(delta, "fp32"), chunk_bytes=CHUNK))
        start.wait(30)
        try:
            outcomes[i] = stub.UploadUpdate(iter(msgs), metadata=dev.md, timeout=120)
        except grpc.RpcError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=send, args=(i, d)) for i, d in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    acked = [i for i, o in outcomes.items() if isinstance(o, aggregator_pb2.UploadAck)]
    refused = {i: o.code() for i, o in outcomes.items() if isinstance(o, grpc.RpcError)}
    assert len(acked) == 1, outcomes
    assert set(refused.values()) <= {grpc.StatusCode.ABORTED, grpc.StatusCode.ALREADY_EXISTS}, outcomes
    _assert_folded_exactly(fleet, a, (first, second)[acked[0]])


def test_a_stream_whose_round_closes_under_it_is_told_late_not_internal(tmp_path: Path) -> None:
    """The round ends (its deadline passes with no quorum) while a stream is between chunks: its staging directory
    goes with the round, and the rest of the stream must be refused as late (FAILED_PRECONDITION), never INTERNAL."""
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=1, quorum=1, rounds=1,
                   round_deadline_s=4.0, on_deadline="fail", ticket_grace_s=60.0)
    fleet = Fleet(tmp_path, job).start()
    try:
        fleet.register("a", train_memory_mb=64, tier="laptop")
        stub, dev = fleet.agg_stub(), fleet.devices["a"]
        a, delta, _ = _assignment_and_deltas(fleet)
        release = threading.Event()

        def held(msgs: list[aggregator_pb2.UploadMessage]) -> Iterator[aggregator_pb2.UploadMessage]:
            for i, m in enumerate(msgs):
                if i == 4:  # header, manifest and 2 chunks are in; the rest comes after the round ended
                    release.wait(60)
                yield m

        msgs = list(upload_messages(a.ticket, 5, payload(delta, "fp32"), chunk_bytes=CHUNK))
        call = stub.UploadUpdate.future(held(msgs), metadata=dev.md, timeout=120)
        rnd = fleet.wait_round(stub, a.round_id)  # the deadline passes with nothing accepted
        assert rnd.state == aggregator_pb2.ROUND_STATE_FAILED, rnd
        release.set()
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    finally:
        release.set()
        fleet.stop()
