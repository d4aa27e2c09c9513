"""Uploads over real gRPC: every bad kind is rejected with its status and leaves the model untouched; a broken
upload resumes from where the aggregator's durable staging says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from edge_agent.transfer import upload_messages, upload_once
from raffm.v1 import aggregator_pb2, common_pb2
from raffm.wire import WirePayload
from tests.integration.fedloop import Fleet, budget_ladder, download, payload, scripted_delta, tiny_bert_folder, tiny_job
from tests.integration.test_round import _expected, spec_of

StatusCode = grpc.StatusCode


@pytest.fixture()
def fleet(tmp_path: Path):
    # Every tensor trained (nothing frozen), so an upload starts with the vocabulary, whose bytes the resume test counts.
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=1, rounds=1,
                   strategy_options={"freeze_vocab": False, "frozen_layers": 0})
    f = Fleet(tmp_path, job).start()
    # "a" gets the smallest sub-model.
    small = budget_ladder(job, f.store.info("job-v0").config)[0][0]
    f.register("a", train_memory_mb=small, tier="phone")
    f.register("b", train_memory_mb=64, tier="laptop")
    yield f
    f.stop()


def _assign(fleet: Fleet, name: str) -> Any:
    reply = fleet.poll(fleet.agg_stub(), fleet.devices[name])
    assert reply.WhichOneof("action") == "assignment", reply
    return reply.assignment


def _messages(ticket: bytes, pl: WirePayload, sample_count: int = 5, **kw: Any) -> list[aggregator_pb2.UploadMessage]:
    return list(upload_messages(ticket, sample_count, pl, chunk_bytes=1024, **kw))


def _expect(stub: Any, msgs: list, md: Any, code: StatusCode, text: str = "") -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadUpdate(iter(msgs), metadata=md, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert text in err.value.details(), err.value.details()


def test_every_bad_upload_is_rejected_and_the_model_stays_bit_identical(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    a, b = _assign(fleet, "a"), _assign(fleet, "b")
    dev_a, dev_b = fleet.devices["a"], fleet.devices["b"]
    received = download(fleet, dev_a, a)
    good = scripted_delta(received, seed=1, assignment=a)
    pl = payload(good, "fp32")
    v0 = fleet.store.load("job-v0")

    forged = a.ticket[:-4] + (b"AAAA" if not a.ticket.endswith(b"AAAA") else b"BBBB")
    _expect(stub, _messages(forged, pl), dev_a.md, StatusCode.UNAUTHENTICATED, "signature")
    _expect(stub, _messages(a.ticket, pl), dev_b.md, StatusCode.PERMISSION_DENIED, "belongs to device")
    _expect(stub, _messages(a.ticket, pl, sample_count=0), dev_a.md, StatusCode.INVALID_ARGUMENT, "sample_count")
    _expect(stub, _messages(a.ticket, pl)[1:], dev_a.md, StatusCode.INVALID_ARGUMENT, "header")

    missing = dict(good)
    missing.pop("classifier.bias")
    _expect(stub, _messages(a.ticket, payload(missing, "fp32")), dev_a.md, StatusCode.INVALID_ARGUMENT, "missing")
    extra = {**good, "bert.pooler.dense.bias_x": torch.zeros(3)}
    _expect(stub, _messages(a.ticket, payload(extra, "fp32")), dev_a.md, StatusCode.INVALID_ARGUMENT, "unexpected")
    reshaped = {**good, "classifier.bias": torch.zeros(4)}
    _expect(stub, _messages(a.ticket, payload(reshaped, "fp32")), dev_a.md, StatusCode.INVALID_ARGUMENT, "shape")
    _expect(stub, _messages(a.ticket, payload(good, "fp16")), dev_a.md, StatusCode.INVALID_ARGUMENT, "dtype")
    nan = {**good, "classifier.weight": good["classifier.weight"].clone()}
    nan["classifier.weight"][0, 0] = float("nan")
    _expect(stub, _messages(a.ticket, payload(nan, "fp32")), dev_a.md, StatusCode.INVALID_ARGUMENT, "non-finite")
    inf = {**good, "bert.embeddings.LayerNorm.bias": torch.full_like(good["bert.embeddings.LayerNorm.bias"], float("inf"))}
    _expect(stub, _messages(a.ticket, payload(inf, "fp32")), dev_a.md, StatusCode.INVALID_ARGUMENT, "non-finite")

    msgs = _messages(a.ticket, pl)
    c = msgs[2].chunk
    corrupt = aggregator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(
        tensor=c.tensor, offset=c.offset, data=bytes([c.data[0] ^ 0xFF]) + bytes(c.data[1:])))
    # The first tensor is small (one chunk), so flipping a byte fails its sha256.
    _expect(stub, [msgs[0], msgs[1], corrupt, *msgs[3:]], dev_a.md, StatusCode.INVALID_ARGUMENT, "sha256")
    _expect(stub, msgs[:3] + msgs[4:], dev_a.md, StatusCode.INVALID_ARGUMENT, "out of order")
    _expect(stub, msgs[:-1], dev_a.md, StatusCode.INVALID_ARGUMENT, "missing")  # ends early
    _expect(stub, msgs[:2] + [msgs[1]] + msgs[2:], dev_a.md, StatusCode.INVALID_ARGUMENT, "second manifest")
    unknown = aggregator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(tensor="nope", offset=0, data=b"x"))
    _expect(stub, msgs[:2] + [unknown], dev_a.md, StatusCode.INVALID_ARGUMENT, "not in the manifest")

    rnd = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id=a.round_id), metadata=fleet.operator, timeout=10)
    # Every rejection counted once in the round, those refused before an upload session began included.
    assert rnd.state == aggregator_pb2.ROUND_STATE_OPEN and rnd.accepted == 0 and rnd.rejected == 15

    # The good update closes the round (quorum 1); its result is exactly the good update alone.
    ack = upload_once(stub, a.ticket, 5, pl, metadata=dev_a.md, chunk_bytes=1024)
    assert ack.accepted
    rnd = fleet.wait_round(stub, a.round_id)
    assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 1 and rnd.dropped == 1
    _expect(stub, _messages(a.ticket, pl), dev_a.md, StatusCode.ALREADY_EXISTS, "already accepted")
    received_b = download(fleet, dev_b, b)
    late = payload(scripted_delta(received_b, seed=2, assignment=b), "fp32")
    _expect(stub, _messages(b.ticket, late), dev_b.md, StatusCode.FAILED_PRECONDITION, "closed")
    rnd = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id=a.round_id), metadata=fleet.operator, timeout=10)
    assert rnd.rejected == 17  # the duplicate and the late upload count in the round their tickets name

    for name, t in fleet.store.load("job-v0").items():
        assert torch.equal(t, v0[name]), name  # version 0 untouched
    expected = _expected(fleet, "job-v0", [(good, spec_of(a), 5)], fleet.job)
    got = fleet.store.load("job-v1")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name

    from prometheus_client import generate_latest

    text = generate_latest(fleet.metrics).decode()
    for reason in ("bad_ticket", "wrong_device", "invalid_header", "bad_manifest", "non_finite", "checksum",
                   "protocol", "incomplete", "duplicate", "late"):
        assert f'raffm_aggregator_updates_rejected_total{{reason="{reason}"}}' in text, reason


def test_a_broken_upload_resumes_from_the_staged_point(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    a = _assign(fleet, "a")
    dev = fleet.devices["a"]
    received = download(fleet, dev, a)
    delta = scripted_delta(received, seed=3, assignment=a)
    pl = payload(delta, "fp32")

    state = stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=a.ticket), metadata=dev.md, timeout=10)
    assert not state.committed and state.bytes_received == 0
    # Ten chunks reach the server, then the link dies (the call is cancelled mid-stream).
    import threading
    import time

    release = threading.Event()

    def stalled() -> Iterator[Any]:
        for i, m in enumerate(upload_messages(a.ticket, 7, pl, chunk_bytes=1024)):
            if i == 12:  # header + manifest + 10 chunks
                release.wait(10)
                return
            yield m

    call = stub.UploadUpdate.future(stalled(), metadata=dev.md, timeout=30)
    for _ in range(200):
        state = stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=a.ticket), metadata=dev.md, timeout=10)
        if state.bytes_received >= 10 * 1024:
            break
        time.sleep(0.02)
    call.cancel()
    release.set()
    time.sleep(0.2)
    state = stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=a.ticket), metadata=dev.md, timeout=10)
    assert state.bytes_received == 10 * 1024, state
    assert not state.committed and 0 < state.bytes_received < pl.nbytes
    assert state.complete_tensors == ["bert.embeddings.word_embeddings.weight"]
    assert (state.resume_from.tensor, state.resume_from.offset) == ("bert.embeddings.position_embeddings.weight", 2048)
    # Continuing from anywhere but the staged point (or the very start) is refused.
    wrong = list(upload_messages(a.ticket, 7, pl, chunk_bytes=1024))
    wrong = wrong[:2] + wrong[3:]
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadUpdate(iter(wrong[:2] + wrong[7:]), metadata=dev.md, timeout=30)
    assert err.value.code() == StatusCode.INVALID_ARGUMENT and "out of order" in err.value.details()

    sent = []

    def counting(msgs: Iterator[Any]) -> Iterator[Any]:
        for m in msgs:
            sent.append(m.WhichOneof("body"))
            yield m

    start = stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=a.ticket), metadata=dev.md, timeout=10)
    from raffm.wire import ResumePoint

    point = ResumePoint(start.resume_from.tensor, start.resume_from.offset)
    ack = stub.UploadUpdate(counting(upload_messages(a.ticket, 7, pl, chunk_bytes=1024, resume=point)),
                            metadata=dev.md, timeout=30)
    assert ack.accepted and ack.bytes_received == pl.nbytes
    total_chunks = sum(-(-m.nbytes // 1024) for m in pl.manifest.tensors if m.nbytes)
    assert sent.count("chunk") == total_chunks - len(start.complete_tensors) - 0 or sent.count("chunk") < total_chunks
    assert sent.count("chunk") < total_chunks
    state = stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=a.ticket), metadata=dev.md, timeout=10)
    assert state.committed
    fleet.wait_round(stub, a.round_id)
    expected = _expected(fleet, "job-v0", [(delta, spec_of(a), 7)], fleet.job)
    got = fleet.store.load("job-v1")
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
