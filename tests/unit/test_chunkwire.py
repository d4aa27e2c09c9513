"""raffm.chunkwire: chunk messages written and read without protobuf's copies, byte for byte what protobuf does."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from raffm.chunkwire import DOWNLOAD, UPLOAD, ChunkMessage
from raffm.v1 import aggregator_pb2, common_pb2, extractor_pb2
from raffm.wire import Chunk

CODECS = [DOWNLOAD, UPLOAD]
names = st.text(max_size=40)
offsets = st.integers(0, 2**64 - 1)
payloads = st.binary(max_size=300)


def _proto(codec, tensor: str, offset: int, data: bytes):
    return codec.message_type(chunk=common_pb2.TensorChunk(tensor=tensor, offset=offset, data=data))


@pytest.mark.parametrize("codec", CODECS, ids=["download", "upload"])
@given(tensor=names, offset=offsets, data=payloads)
def test_encoded_chunks_are_protobufs_own_bytes_and_read_back_as_views(codec, tensor, offset, data) -> None:
    sent = codec.serialize(ChunkMessage(Chunk(tensor, offset, memoryview(data))))
    assert sent == _proto(codec, tensor, offset, data).SerializeToString()
    got = codec.deserialize(sent)
    assert isinstance(got, ChunkMessage) and got.WhichOneof("body") == "chunk"
    assert (got.chunk.tensor, got.chunk.offset, bytes(got.chunk.data)) == (tensor, offset, data)
    if data:
        assert isinstance(got.chunk.data, memoryview) and got.chunk.data.obj is sent  # no copy


@pytest.mark.parametrize("codec", CODECS, ids=["download", "upload"])
@given(raw=st.binary(max_size=64))
def test_any_bytes_read_as_protobuf_reads_them(codec, raw) -> None:
    """Fuzz: whatever arrives, the codec's message says what protobuf's says, or both refuse it."""
    try:
        expected = codec.message_type.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            codec.deserialize(raw)
        return
    got = codec.deserialize(raw)
    if isinstance(got, ChunkMessage):
        assert expected.WhichOneof("body") == "chunk"
        c = expected.chunk
        assert (got.chunk.tensor, got.chunk.offset, bytes(got.chunk.data)) == (c.tensor, c.offset, c.data)
    else:
        assert got == expected


def test_messages_that_are_not_a_lone_known_chunk_go_through_protobuf() -> None:
    manifest = extractor_pb2.SliceMessage(manifest=common_pb2.Manifest())
    header = aggregator_pb2.UploadMessage(header=aggregator_pb2.UpdateHeader(ticket=b"t", sample_count=3))
    chunk = _proto(DOWNLOAD, "w", 5, b"abc").SerializeToString()
    unknown_field = chunk[:1] + bytes([chunk[1] + 2]) + chunk[2:] + b"\x20\x07"  # TensorChunk field 4 = 7
    for codec, raw in [(DOWNLOAD, manifest.SerializeToString()), (UPLOAD, header.SerializeToString()),
                       (DOWNLOAD, unknown_field), (DOWNLOAD, chunk + chunk)]:  # two chunk fields: protobuf merges
        got = codec.deserialize(raw)
        assert not isinstance(got, ChunkMessage) and got == codec.message_type.FromString(raw)
    assert DOWNLOAD.deserialize(unknown_field).chunk.data == b"abc"


def test_malformed_chunks_fail_as_protobuf_fails() -> None:
    good = _proto(DOWNLOAD, "w", 5, b"abcdef").SerializeToString()
    bad_name = _proto(DOWNLOAD, "é", 0, b"x").SerializeToString().replace("é".encode(), b"\xff\xfe")
    for raw in [good[:-2], bad_name]:
        with pytest.raises(DecodeError):
            DOWNLOAD.deserialize(raw)


def test_protobuf_messages_are_serialized_as_they_are() -> None:
    manifest = extractor_pb2.SliceMessage(manifest=common_pb2.Manifest(tensors=[common_pb2.TensorInfo(name="w")]))
    assert DOWNLOAD.serialize(manifest) == manifest.SerializeToString()
