"""Tensor chunks on the wire without protobuf's copies.

Nearly every byte of a transfer travels in a chunk message: a ``SliceMessage`` or ``UploadMessage`` whose only field
is its ``chunk`` (a ``TensorChunk`` of tensor name, offset and up to a few MiB of data). Through the protobuf API a
sender copies that data three times (into the ``TensorChunk``, into the message, out of it when serializing) and a
receiver once more on every read of ``.data``; at a MiB per chunk those copies cost the extractor more CPU than the
rest of a download. A :class:`ChunkCodec` writes exactly the bytes protobuf writes (proto3: fields in number order,
default values left out) with one copy, and reads them back as views of the received buffer, with none. Anything
else (a manifest, a header, a chunk with fields it does not know) goes through protobuf, so peers built from the
protos alone interoperate both ways.

A decoded chunk is a :class:`ChunkMessage`: it answers ``WhichOneof`` and ``.chunk`` (``tensor``, ``offset``,
``data``) like the message it stands for, so code that reads messages needs no second path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raffm.v1 import aggregator_pb2, common_pb2, extractor_pb2
from raffm.wire import Chunk

_LEN, _VARINT = 2, 0  # protobuf wire types
_CHUNK_FIELDS = common_pb2.TensorChunk.DESCRIPTOR.fields_by_name
_TENSOR = _CHUNK_FIELDS["tensor"].number << 3 | _LEN
_OFFSET = _CHUNK_FIELDS["offset"].number << 3 | _VARINT
_DATA = _CHUNK_FIELDS["data"].number << 3 | _LEN


@dataclass(frozen=True, slots=True)
class ChunkMessage:
    """A message whose only field is ``chunk``; ``chunk.data`` is a view of the buffer it arrived in (or, to send,
    of the tensor it comes from)."""

    chunk: Chunk

    def WhichOneof(self, _group: str) -> str:  # noqa: N802 - the protobuf message API it stands in for
        return "chunk"


class ChunkCodec:
    """Serializer and deserializer of one chunk-carrying message type (a gRPC method's request or response)."""

    def __init__(self, message_type: Any) -> None:
        self.message_type = message_type
        self._key = message_type.DESCRIPTOR.fields_by_name["chunk"].number << 3 | _LEN
        self._parse: Callable[[bytes], Any] = message_type.FromString

    def serialize(self, message: Any) -> bytes:
        if isinstance(message, ChunkMessage):
            return self.encode(message.chunk)
        return message.SerializeToString()

    def encode(self, chunk: Chunk) -> bytes:
        """The message with ``chunk`` as its only field, byte for byte as protobuf serializes it."""
        name = chunk.tensor.encode()
        data = memoryview(chunk.data).cast("B")
        inner: list[Any] = []
        if name:
            inner += [_varint(_TENSOR), _varint(len(name)), name]
        if chunk.offset:
            inner += [_varint(_OFFSET), _varint(chunk.offset)]
        if len(data):
            inner += [_varint(_DATA), _varint(len(data)), data]
        size = sum(len(p) for p in inner)
        return b"".join([_varint(self._key), _varint(size), *inner])

    def deserialize(self, buffer: bytes) -> Any:
        """A :class:`ChunkMessage` viewing ``buffer`` when it holds a lone chunk, else the parsed protobuf message
        (which raises protobuf's ``DecodeError`` for malformed bytes)."""
        message = _lone_chunk(memoryview(buffer), self._key)
        return message if message is not None else self._parse(buffer)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; (-1, pos) when truncated or longer than 64 bits."""
    value = shift = 0
    while pos < len(view) and shift < 64:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value, pos) if value < 1 << 64 else (-1, pos)
        shift += 7
    return -1, pos


def _lone_chunk(view: memoryview, key: int) -> ChunkMessage | None:
    """The chunk in ``view`` when ``view`` is exactly one ``chunk`` field of known sub-fields; None otherwise."""
    field, pos = _read_varint(view, 0)
    if field != key:
        return None
    size, pos = _read_varint(view, pos)
    if size < 0 or pos + size != len(view):
        return None
    tensor, offset, data = "", 0, view[len(view):]
    while pos < len(view):
        field, pos = _read_varint(view, pos)
        if field == _OFFSET:
            offset, pos = _read_varint(view, pos)
            if offset < 0:
                return None
            continue
        if field not in (_TENSOR, _DATA):
            return None
        length, pos = _read_varint(view, pos)
        if length < 0 or pos + length > len(view):
            return None
        if field == _DATA:
            data = view[pos:pos + length]
        else:
            try:
                tensor = str(view[pos:pos + length], "utf-8")
            except UnicodeDecodeError:
                return None  # protobuf rejects it with its own error
        pos += length
    return ChunkMessage(Chunk(tensor, offset, data))


DOWNLOAD = ChunkCodec(extractor_pb2.SliceMessage)
UPLOAD = ChunkCodec(aggregator_pb2.UploadMessage)
