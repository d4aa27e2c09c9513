"""The tensor wire codec, reassembly and the protobuf mapping of manifests: dtype conversion, manifests, chunking,
reassembly, resume and every protocol error."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raffm import proto, wire
from raffm.reassembly import MemorySink, Reassembler
from raffm.wire import (
    END,
    ChecksumError,
    IncompleteError,
    Manifest,
    ManifestError,
    OutOfOrderError,
    OverlongError,
    ResumePoint,
    TensorMeta,
    UnknownTensorError,
    WirePayload,
    iter_chunks,
)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(33, 17, generator=g),
        "a.bias": torch.randn(33, generator=g),
        "empty": torch.zeros(0, 4),
        "b.weight": torch.randn(5, 3, 2, generator=g),
    }


def _send(payload: WirePayload, sink: MemorySink | None = None, start: ResumePoint = wire.START,
          chunk_bytes: int = 1024) -> Reassembler:
    sink = sink or MemorySink()
    r = Reassembler(payload.manifest, sink, start)
    for c in iter_chunks(payload.manifest, payload.source, start, chunk_bytes):
        r.accept(c.tensor, c.offset, c.data)
    return r


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_in_every_wire_dtype(dtype: str) -> None:
    state = _state()
    payload = WirePayload.from_state(state, dtype)
    sink = MemorySink()
    r = _send(payload, sink)
    r.finish()
    assert r.done and r.resume_point == END
    assert list(sink.tensors) == list(state)
    for name, t in state.items():
        got = sink.tensors[name]
        assert got.dtype == wire.WIRE_DTYPES[wire.wire_dtype_name(dtype)]
        assert torch.equal(got, t.to(got.dtype)), name
        assert torch.equal(got.float(), t.to(got.dtype).float())


def test_manifest_describes_the_wire_bytes() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    meta = wire.describe("x", wire.to_wire(t, "fp16"))
    assert meta.dtype == "float16" and meta.shape == (2, 3) and meta.nbytes == 12
    assert meta.sha256 == hashlib.sha256(t.half().numpy().tobytes()).digest()
    msg = proto.manifest_to_proto(Manifest((meta,)), model_version="v1")
    assert proto.manifest_from_proto(msg) == Manifest((meta,))
    assert msg.total_bytes == 12 and msg.model_version == "v1"


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=6),
    chunk=st.integers(min_value=1024, max_value=4096),
    cut=st.floats(min_value=0.0, max_value=1.0),
)
def test_resume_anywhere_reassembles_identical_bytes(sizes: list[int], chunk: int, cut: float) -> None:
    """Break a transfer after any number of chunks; resuming from the reported point gives the same tensors."""
    state = {f"t{i}": torch.randn(n) for i, n in enumerate(sizes)}
    payload = WirePayload.from_state(state, "fp32")
    chunks = list(iter_chunks(payload.manifest, payload.source, chunk_bytes=chunk))
    stop = int(cut * len(chunks))
    sink = MemorySink()
    first = Reassembler(payload.manifest, sink)
    for c in chunks[:stop]:
        first.accept(c.tensor, c.offset, c.data)
    point = first.resume_point
    assert first.bytes_held == payload.manifest.bytes_before(point)
    second = Reassembler(payload.manifest, sink, point)
    for c in iter_chunks(payload.manifest, payload.source, point, chunk):
        second.accept(c.tensor, c.offset, c.data)
    second.finish()
    assert second.bytes_held == payload.manifest.total_bytes
    for name, t in state.items():
        assert torch.equal(sink.tensors[name], t)


def test_chunks_never_exceed_the_chunk_size_and_cover_each_tensor_once() -> None:
    payload = WirePayload.from_state({"w": torch.randn(3000)}, "fp32")
    chunks = list(iter_chunks(payload.manifest, payload.source, chunk_bytes=4096))
    assert [c.offset for c in chunks] == list(range(0, 12000, 4096))
    assert all(len(c.data) <= 4096 for c in chunks) and sum(len(c.data) for c in chunks) == 12000


def test_out_of_order_overlong_unknown_and_empty_chunks_are_rejected_without_moving() -> None:
    payload = WirePayload.from_state(_state(), "fp32")
    r = Reassembler(payload.manifest, MemorySink())
    with pytest.raises(UnknownTensorError, match="'nope'"):
        r.accept("nope", 0, b"x")
    with pytest.raises(OutOfOrderError, match="expected \\('a.weight', offset 0\\)"):
        r.accept("a.bias", 0, b"x" * 4)
    with pytest.raises(OutOfOrderError):
        r.accept("a.weight", 8, b"x" * 4)
    with pytest.raises(OverlongError, match="past the tensor's 2244 bytes"):
        r.accept("a.weight", 0, b"x" * 3000)
    with pytest.raises(wire.WireError, match="empty chunk"):
        r.accept("a.weight", 0, b"")
    assert r.resume_point == ResumePoint("a.weight", 0) and r.bytes_held == 0
    with pytest.raises(IncompleteError, match="'a.weight' offset 0"):
        r.finish()


def test_corrupted_tensor_fails_its_checksum_and_must_be_resent() -> None:
    payload = WirePayload.from_state({"w": torch.randn(10), "v": torch.randn(3)}, "fp32")
    sink = MemorySink()
    r = Reassembler(payload.manifest, sink)
    good = bytes(payload.source(payload.manifest["w"]))
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(ChecksumError, match="'w'"):
        r.accept("w", 0, bad)
    assert r.resume_point == ResumePoint("w", 0) and "w" not in sink.tensors
    r.accept("w", 0, good)
    assert r.resume_point == ResumePoint("v", 0)


def test_data_after_the_end_is_overlong() -> None:
    payload = WirePayload.from_state({"w": torch.randn(2)}, "fp32")
    r = _send(payload)
    with pytest.raises(OverlongError, match="after the transfer was complete"):
        r.accept("w", 8, b"x")


def test_bad_manifests_and_resume_points() -> None:
    with pytest.raises(ManifestError, match="nbytes is 5"):
        Manifest((TensorMeta("x", "float32", (2,), 5, b"\0" * 32),))
    with pytest.raises(ManifestError, match="appears twice"):
        meta = TensorMeta("x", "float32", (2,), 8, b"\0" * 32)
        Manifest((meta, meta))
    with pytest.raises(ManifestError, match="dtype 'int8'"):
        Manifest((TensorMeta("x", "int8", (2,), 2, b"\0" * 32),))
    payload = WirePayload.from_state({"w": torch.randn(2)}, "fp32")
    with pytest.raises(wire.WireError, match="outside tensor"):
        list(iter_chunks(payload.manifest, payload.source, ResumePoint("w", 9)))
    with pytest.raises(UnknownTensorError):
        list(iter_chunks(payload.manifest, payload.source, ResumePoint("zz", 0)))
    with pytest.raises(wire.WireError, match="chunk_bytes"):
        list(iter_chunks(payload.manifest, payload.source, chunk_bytes=10))


def test_wire_dtype_names() -> None:
    assert proto.wire_dtype_from_proto(0) == "float32" and proto.wire_dtype_from_proto(3) == "bfloat16"
    assert wire.wire_dtype_name("FP16") == "float16" and proto.wire_dtype_to_proto("bf16") == 3
    with pytest.raises(wire.WireError, match="fp8"):
        wire.wire_dtype_name("fp8")


def test_large_tensor_streams_without_a_joined_copy() -> None:
    """A 64 MiB tensor chunked at 1 MiB: every chunk is a slice, and the source buffer is never concatenated."""
    t = torch.randn(16 * (1 << 20))
    payload = WirePayload.from_state({"big": t}, "fp32")
    calls = []

    def source(meta: TensorMeta) -> memoryview:
        calls.append(meta.name)
        return payload.source(meta)

    digest = hashlib.sha256()
    n = 0
    for c in iter_chunks(payload.manifest, source):
        assert len(c.data) == wire.DEFAULT_CHUNK_BYTES
        digest.update(c.data)
        n += 1
    assert n == 64 and calls == ["big"] and digest.digest() == payload.manifest["big"].sha256
