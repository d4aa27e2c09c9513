"""The receiving side of a transfer: tensor sinks, and the reassembler that verifies each tensor and knows where to
resume.

A :class:`Reassembler` accepts the chunks of one :class:`raffm.wire.Manifest` in order and writes them into a
:class:`TensorSink` (memory for clients and tests, a staging directory for the aggregator); it verifies every
tensor's sha256 when its last byte arrives and, after a broken connection, reports the
:class:`raffm.wire.ResumePoint` the sender continues from. Pure: no network, no files of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from raffm.errors import excerpt
from raffm.wire import (
    END, START, ChecksumError, IncompleteError, Manifest, OutOfOrderError, OverlongError, ResumePoint, TensorMeta,
    WireError, from_wire,
)



class TensorSink(Protocol):
    """Where a Reassembler puts bytes. Offsets arrive in increasing order within a tensor."""

    def write(self, meta: TensorMeta, offset: int, data: bytes | memoryview) -> None: ...

    def complete(self, meta: TensorMeta) -> None:
        """The tensor's bytes are all written and their sha256 verified."""

    def discard(self, meta: TensorMeta) -> None:
        """The tensor's bytes failed verification: forget them so it can be received again."""

    def received(self, meta: TensorMeta) -> Iterable[Any]:
        """The bytes already held for a partially received tensor (to re-hash them on resume)."""


class MemorySink:
    """Collects tensors in memory: ``tensors[name]`` once complete. For clients and tests."""

    def __init__(self) -> None:
        self.buffers: dict[str, bytearray] = {}
        self.filled: dict[str, int] = {}
        self.tensors: dict[str, torch.Tensor] = {}

    def write(self, meta: TensorMeta, offset: int, data: bytes | memoryview) -> None:
        buf = self.buffers.get(meta.name)
        if buf is None:
            buf = self.buffers[meta.name] = bytearray(meta.nbytes)
        buf[offset : offset + len(data)] = data
        self.filled[meta.name] = offset + len(data)

    def complete(self, meta: TensorMeta) -> None:
        buf = self.buffers.pop(meta.name, bytearray())
        self.filled.pop(meta.name, None)
        self.tensors[meta.name] = from_wire(buf, meta)

    def discard(self, meta: TensorMeta) -> None:
        self.buffers.pop(meta.name, None)
        self.filled.pop(meta.name, None)

    def received(self, meta: TensorMeta) -> Iterable[Any]:
        buf = self.buffers.get(meta.name)
        if buf is None:
            return ()
        return (memoryview(buf)[: self.filled.get(meta.name, 0)],)


class HashOnlySink:
    """Verifies and counts but keeps nothing: for benchmarks and transfers too big to hold."""

    def __init__(self) -> None:
        self.completed: list[str] = []
        self.partial: dict[str, hashlib._Hash] = {}

    def write(self, meta: TensorMeta, offset: int, data: bytes | memoryview) -> None:
        pass

    def complete(self, meta: TensorMeta) -> None:
        self.completed.append(meta.name)

    def discard(self, meta: TensorMeta) -> None:
        pass

    def received(self, meta: TensorMeta) -> Iterable[Any]:
        raise WireError("HashOnlySink keeps no bytes, so it cannot resume inside a tensor")


class Reassembler:
    """Accepts chunks for one manifest in order, verifies each tensor's sha256, and knows where to resume.

    ``start`` continues a transfer whose earlier part the ``sink`` already holds (tensors before ``start.tensor``
    complete, ``start.offset`` bytes of it written); the partial tensor's bytes are re-hashed from the sink.
    Every error leaves the reassembler at the same resume point, so a sender can retry from :attr:`resume_point`.
    """

    def __init__(self, manifest: Manifest, sink: TensorSink, start: ResumePoint = START) -> None:
        self.manifest = manifest
        self.sink = sink
        self._i, self._offset = manifest.locate(start)
        self._complete_bytes = sum(m.nbytes for m in manifest.tensors[: self._i])
        self._received = 0
        self._hash = hashlib.sha256()
        if self._offset:
            meta = manifest.tensors[self._i]
            for buf in sink.received(meta):
                self._hash.update(buf)
        self._finish_if_complete()

    @property
    def done(self) -> bool:
        return self._i >= len(self.manifest)

    @property
    def resume_point(self) -> ResumePoint:
        if self.done:
            return END
        return ResumePoint(self.manifest.tensors[self._i].name, self._offset)

    @property
    def bytes_held(self) -> int:
        """Bytes of the manifest held, including what was held before this reassembler started."""
        return self._complete_bytes + self._offset

    @property
    def bytes_received(self) -> int:
        """Bytes accepted by this reassembler."""
        return self._received

    def accept(self, tensor: str, offset: int, data: bytes | memoryview) -> TensorMeta | None:
        """Take one chunk; returns the tensor's meta when this chunk completed (and verified) it."""
        if self.done:
            raise OverlongError(f"chunk for tensor {excerpt(tensor)} arrived after the transfer was complete")
        pos = self.manifest.position(tensor)  # UnknownTensorError
        meta = self.manifest.tensors[self._i]
        if pos != self._i or offset != self._offset:
            raise OutOfOrderError(
                f"chunk ({excerpt(tensor)}, offset {offset}) is out of order; expected ({excerpt(meta.name)}, offset {self._offset})"
            )
        if not data:
            raise WireError(f"empty chunk for tensor {excerpt(tensor)} at offset {offset}")
        end = offset + len(data)
        if end > meta.nbytes:
            raise OverlongError(
                f"chunk for tensor {excerpt(tensor)} ends at byte {end}, past the tensor's {meta.nbytes} bytes"
            )
        self.sink.write(meta, offset, data)
        self._hash.update(data)
        self._offset = end
        self._received += len(data)
        if end == meta.nbytes:
            return self._finish_if_complete()
        return None

    def finish(self) -> None:
        """Raise IncompleteError unless every tensor is complete."""
        if not self.done:
            point = self.resume_point
            raise IncompleteError(
                f"transfer ended at tensor {excerpt(point.tensor)} offset {point.offset}; "
                f"{self.manifest.total_bytes - self.bytes_held} bytes missing"
            )

    def _finish_if_complete(self) -> TensorMeta | None:
        """Verify and complete the current tensor if all its bytes are in; then skip zero-length tensors."""
        last: TensorMeta | None = None
        while not self.done:
            meta = self.manifest.tensors[self._i]
            if self._offset < meta.nbytes:
                break
            if self._hash.digest() != meta.sha256:
                self.sink.discard(meta)
                self._offset = 0
                self._hash = hashlib.sha256()
                raise ChecksumError(
                    f"tensor {excerpt(meta.name)}: sha256 of the {meta.nbytes} received bytes does not match the manifest;"
                    " resend it from offset 0"
                )
            self.sink.complete(meta)
            last = meta
            self._complete_bytes += meta.nbytes
            self._i += 1
            self._offset = 0
            self._hash = hashlib.sha256()
        return last
