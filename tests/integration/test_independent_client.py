"""A device client written from the protos alone: the generated stubs, hashlib and torch, none of the agent's code.

It does what `protos/raffm/v1/*.proto` tells a client to do (register, poll, download the slice named by the ticket,
check every tensor's sha256, train, upload the delta of the tensors its recipe does not freeze, with an empty
TrainMetrics) and the services must take its update into the next version exactly. What it gets wrong must come back
as a status and an ErrorDetail that say what to fix, and the corrected upload must still be accepted; a broken upload
resumes from where QueryUpload says.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from raffm.v1 import (
    aggregator_pb2, aggregator_pb2_grpc, common_pb2, extractor_pb2, extractor_pb2_grpc, registry_pb2,
    registry_pb2_grpc,
)
from services.registry.testing import ENROLL_KEY
from tests.integration.fedloop import Fleet, tiny_bert_folder, tiny_job

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WIRE_NAMES = {common_pb2.WIRE_DTYPE_FP32: "float32", common_pb2.WIRE_DTYPE_FP16: "float16",
              common_pb2.WIRE_DTYPE_BF16: "bfloat16", common_pb2.WIRE_DTYPE_UNSPECIFIED: "float32"}
CHUNK = 4096


@pytest.fixture()
def fleet(tmp_path: Path):
    f = Fleet(tmp_path, tiny_job(tiny_bert_folder(tmp_path / "model"), rounds=1, clients_per_round=1, quorum=1,
                                 wire_dtype="fp16")).start()
    yield f
    f.stop()


def _error(err: grpc.RpcError) -> common_pb2.ErrorDetail:
    detail = dict(err.trailing_metadata() or ()).get("raffm-error-bin")
    assert detail is not None, f"{err.code()}: {err.details()} came without an ErrorDetail"
    return common_pb2.ErrorDetail.FromString(detail)


def _download(stub: extractor_pb2_grpc.ExtractorServiceStub, ticket: bytes, md) -> tuple[
        common_pb2.Manifest, dict[str, torch.Tensor]]:
    stream = stub.DownloadSlice(extractor_pb2.DownloadRequest(ticket=ticket, chunk_bytes=CHUNK), metadata=md,
                                timeout=60)
    first = next(stream)
    assert first.WhichOneof("body") == "manifest"
    manifest = first.manifest
    data = {t.name: bytearray() for t in manifest.tensors}
    for message in stream:
        chunk = message.chunk
        assert chunk.offset == len(data[chunk.tensor])  # in order, no gaps
        data[chunk.tensor] += chunk.data
    tensors = {}
    for info in manifest.tensors:
        raw = bytes(data[info.name])
        assert len(raw) == info.nbytes and hashlib.sha256(raw).digest() == info.sha256, info.name
        tensors[info.name] = torch.frombuffer(bytearray(raw), dtype=DTYPES[info.dtype]).reshape(tuple(info.shape))
    assert sum(t.nbytes for t in manifest.tensors) == manifest.total_bytes
    return manifest, tensors


def _upload(ticket: bytes, samples: int, assignment: aggregator_pb2.Assignment,
            delta: dict[str, torch.Tensor]) -> Iterator[aggregator_pb2.UploadMessage]:
    wire = {n: t.contiguous().view(torch.uint8).numpy().tobytes() for n, t in delta.items()}
    yield aggregator_pb2.UploadMessage(header=aggregator_pb2.UpdateHeader(
        ticket=ticket, sample_count=samples, metrics=aggregator_pb2.TrainMetrics()))
    dtype = WIRE_NAMES[assignment.hparams.wire_dtype]
    yield aggregator_pb2.UploadMessage(manifest=common_pb2.Manifest(
        tensors=[common_pb2.TensorInfo(name=n, dtype=dtype, shape=list(t.shape), nbytes=len(wire[n]),
                                       sha256=hashlib.sha256(wire[n]).digest()) for n, t in delta.items()],
        total_bytes=sum(map(len, wire.values())), model_version=assignment.model_version, spec=assignment.spec,
        chunk_bytes=CHUNK, wire_dtype=assignment.hparams.wire_dtype))
    for name, raw in wire.items():
        for offset in range(0, len(raw), CHUNK):
            yield aggregator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(tensor=name, offset=offset,
                                                                            data=raw[offset:offset + CHUNK]))


def _join_and_download(fleet: Fleet, name: str):
    """Register, heartbeat, poll until assigned and download the slice, as the protos say; returns the aggregator
    stub, the bearer metadata, the assignment, and the received tensors."""
    registry = registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(fleet.registry.address))
    aggregator = aggregator_pb2_grpc.AggregatorServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{fleet.aggregator.server.port}"))
    reply = registry.Register(registry_pb2.RegisterRequest(enroll_key=ENROLL_KEY, name=name, profile=(
        common_pb2.DeviceProfile(train_memory_mb=1024, gflops=50, up_mbps=100, down_mbps=100, tier="laptop"))),
        timeout=30)
    md = (("authorization", f"Bearer {reply.token}"),)
    registry.Heartbeat(registry_pb2.HeartbeatRequest(device_id=reply.device_id), metadata=md, timeout=30)
    end = time.monotonic() + 60
    while (poll := aggregator.PollRound(aggregator_pb2.PollRequest(device_id=reply.device_id), metadata=md,
                                       timeout=30)).WhichOneof("action") != "assignment":
        assert time.monotonic() < end, poll
        time.sleep(min(poll.wait.seconds, 0.2))
    a = poll.assignment
    target = a.extractor_target or f"127.0.0.1:{fleet.extractor.server.port}"
    manifest, received = _download(extractor_pb2_grpc.ExtractorServiceStub(grpc.insecure_channel(target)),
                                   a.ticket, md)
    assert manifest.model_version == a.model_version and manifest.spec == a.spec
    # what the device builds its sub-model from: the global model's config, its own copy not needed
    assert json.loads(manifest.model_config_json) == fleet.store.info(a.model_version).config
    return aggregator, md, a, received


def _delta(a: aggregator_pb2.Assignment, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """"Training": a fixed step on every tensor the recipe trains, at the job's wire dtype (fp16)."""
    frozen = set(a.recipe.frozen_tensors)
    assert frozen and frozen < set(received)
    generator = torch.Generator().manual_seed(0)
    return {n: (torch.randn(t.shape, generator=generator) * 1e-2).to(torch.float16)
            for n, t in received.items() if n not in frozen}


def _closed(aggregator, md, round_id: str) -> aggregator_pb2.Round:
    end = time.monotonic() + 60
    while (rnd := aggregator.GetRound(aggregator_pb2.GetRoundRequest(round_id=round_id), metadata=md,
                                      timeout=30)).state != aggregator_pb2.ROUND_STATE_CLOSED:
        assert rnd.state != aggregator_pb2.ROUND_STATE_FAILED and time.monotonic() < end, rnd
        time.sleep(0.1)
    return rnd


def _assert_applied(fleet: Fleet, a: aggregator_pb2.Assignment, rnd: aggregator_pb2.Round,
                    delta: dict[str, torch.Tensor]) -> None:
    """The one update is the round's mean delta, applied as it came (server momentum starts from it)."""
    before, after = fleet.store.load(a.model_version), fleet.store.load(rnd.result_model_version)
    for name in before:
        change = after[name] - before[name]
        if name in delta:
            assert torch.allclose(change, delta[name].float(), atol=1e-6), name
        else:
            assert not change.any(), name


def test_a_client_written_from_the_protos_trains_a_round(fleet: Fleet) -> None:
    aggregator, md, a, received = _join_and_download(fleet, "from-the-protos")
    delta = _delta(a, received)
    samples = a.hparams.batch_size * a.hparams.local_steps
    frozen = set(a.recipe.frozen_tensors)

    # Mistakes come back with what to fix, and lose nothing: a frozen tensor uploaded, then a corrupted checksum.
    frozen_name = sorted(frozen)[0]
    wrong = {**delta, frozen_name: torch.zeros(received[frozen_name].shape, dtype=torch.float16)}
    with pytest.raises(grpc.RpcError) as err:
        aggregator.UploadUpdate(_upload(a.ticket, samples, a, wrong), metadata=md, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and frozen_name in _error(err.value).message
    corrupt = list(_upload(a.ticket, samples, a, delta))
    corrupt[-1].chunk.data = bytes(b ^ 0xFF for b in corrupt[-1].chunk.data)
    with pytest.raises(grpc.RpcError) as err:
        aggregator.UploadUpdate(iter(corrupt), metadata=md, timeout=60)
    assert _error(err.value).reject_reason == "checksum"

    ack = aggregator.UploadUpdate(_upload(a.ticket, samples, a, delta), metadata=md, timeout=60)
    assert ack.accepted and ack.round_id == a.round_id and ack.tensors_received == len(delta)
    assert ack.bytes_received == sum(t.nbytes for t in delta.values())
    rnd = _closed(aggregator, md, a.round_id)
    assert rnd.accepted == 1
    _assert_applied(fleet, a, rnd, delta)


def test_a_broken_upload_resumes_where_query_upload_says(fleet: Fleet) -> None:
    """The stream breaks after some chunks; QueryUpload names the first byte not held, and the header, the manifest
    and the chunks from there complete the update."""
    aggregator, md, a, received = _join_and_download(fleet, "resumer")
    delta = _delta(a, received)
    messages = list(_upload(a.ticket, 5, a, delta))
    assert len(messages) > 6

    def broken() -> Iterator[aggregator_pb2.UploadMessage]:
        yield from messages[: len(messages) // 2]
        raise ConnectionError("the link went down")

    with pytest.raises(grpc.RpcError):
        aggregator.UploadUpdate(broken(), metadata=md, timeout=60)
    held = aggregator.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=a.ticket), metadata=md, timeout=30)
    # How much of the first half the server staged before the break depends on the transport; what it says it holds
    # must be consistent, and resuming from there must complete the update.
    point, names = held.resume_from, list(delta)
    at = names.index(point.tensor) if point.tensor else 0  # empty: from the beginning
    assert not held.committed and list(held.complete_tensors) == names[:at]
    assert held.bytes_received == sum(delta[n].nbytes for n in names[:at]) + point.offset
    rest = [m for m in messages[2:] if (names.index(m.chunk.tensor), m.chunk.offset) >= (at, point.offset)]
    ack = aggregator.UploadUpdate(iter(messages[:2] + rest), metadata=md, timeout=60)
    assert ack.accepted
    _assert_applied(fleet, a, _closed(aggregator, md, a.round_id), delta)
