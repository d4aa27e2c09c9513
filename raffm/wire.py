"""The tensor wire codec: manifests, wire dtypes, chunking and reassembly (pure; no network, no files).

A transfer is a :class:`Manifest` (per tensor: name, wire dtype, shape, byte length, sha256 of the wire bytes)
followed by chunks ``(tensor, offset, data)`` in manifest order, each tensor's bytes in increasing offset. Bytes are
the little-endian C-order buffer of the tensor converted to the wire dtype. Everything is streamed tensor by tensor:
no function here concatenates a whole model into one ``bytes`` object, so totals above 2 GiB are fine.

The receiving side is a :class:`Reassembler` that writes into a :class:`TensorSink` (memory for clients and tests,
a staging directory for the aggregator), verifies every tensor's sha256 when its last byte arrives, and after a
broken connection reports the :class:`ResumePoint` the sender continues from.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = MiB
# Chunks are capped well below the chassis' 64 MiB message limit (framing counts against the limit).
MAX_CHUNK_BYTES = 16 * MiB
MIN_CHUNK_BYTES = 1024

# Wire dtype name <-> torch dtype. Names are what TensorInfo.dtype carries.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# raffm.v1.WireDtype values (0 = unspecified = fp32) <-> names.
_ENUM_TO_NAME = {0: "float32", 1: "float32", 2: "float16", 3: "bfloat16"}
_NAME_TO_ENUM = {"float32": 1, "float16": 2, "bfloat16": 3}
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("raffm.wire assumes a little-endian host (the wire format is little-endian)")


class WireError(ValueError):
    """A transfer does not follow the protocol; the message names the tensor and offset at fault."""


class ManifestError(WireError):
    """A manifest is malformed or does not match what was expected."""


class UnknownTensorError(WireError):
    """A chunk names a tensor that is not in the manifest."""


class OutOfOrderError(WireError):
    """A chunk is not the next expected piece (wrong tensor or offset)."""


class OverlongError(WireError):
    """A chunk runs past the end of its tensor."""


class ChecksumError(WireError):
    """A complete tensor's sha256 differs from the manifest's."""


class IncompleteError(WireError):
    """The transfer ended before every tensor was complete."""


def wire_dtype_name(value: int | str | torch.dtype | None) -> str:
    """Normalise a wire dtype given as a ``WireDtype`` enum value, a name/alias, or a torch dtype."""
    if value is None:
        return "float32"
    if isinstance(value, torch.dtype):
        for name, dtype in WIRE_DTYPES.items():
            if dtype == value:
                return name
        raise WireError(f"torch dtype {value} is not a wire dtype; use one of {', '.join(WIRE_DTYPES)}")
    if isinstance(value, int):
        try:
            return _ENUM_TO_NAME[value]
        except KeyError:
            raise WireError(f"wire dtype enum value {value} is unknown; expected 0..3") from None
    name = _ALIASES.get(value.lower(), value.lower())
    if name not in WIRE_DTYPES:
        raise WireError(f"wire dtype {value!r} is unknown; use one of fp32, fp16, bf16")
    return name


def wire_dtype_enum(name: str) -> int:
    """The ``raffm.v1.WireDtype`` value of a wire dtype name."""
    return _NAME_TO_ENUM[wire_dtype_name(name)]


def itemsize(dtype_name: str) -> int:
    return torch.empty((), dtype=WIRE_DTYPES[wire_dtype_name(dtype_name)]).element_size()


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a transfer. ``nbytes`` = prod(shape) * itemsize(dtype); ``sha256`` of the wire bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    sha256: bytes

    def check(self) -> None:
        """Raise ManifestError when the fields are inconsistent."""
        if not self.name:
            raise ManifestError("a manifest tensor has an empty name")
        if self.dtype not in WIRE_DTYPES:
            raise ManifestError(f"tensor {self.name!r} has dtype {self.dtype!r}; expected one of {list(WIRE_DTYPES)}")
        if any(d < 0 for d in self.shape):
            raise ManifestError(f"tensor {self.name!r} has a negative dimension in shape {self.shape}")
        expected = math.prod(self.shape) * itemsize(self.dtype)
        if self.nbytes != expected:
            raise ManifestError(
                f"tensor {self.name!r}: nbytes is {self.nbytes} but shape {self.shape} in {self.dtype} is {expected}"
            )
        if len(self.sha256) != 32:
            raise ManifestError(f"tensor {self.name!r}: sha256 must be 32 bytes, got {len(self.sha256)}")


@dataclass(frozen=True)
class Manifest:
    """Ordered tensor descriptions of one transfer."""

    tensors: tuple[TensorMeta, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index: dict[str, int] = {}
        for i, meta in enumerate(self.tensors):
            meta.check()
            if meta.name in index:
                raise ManifestError(f"tensor {meta.name!r} appears twice in the manifest")
            index[meta.name] = i
        object.__setattr__(self, "_index", index)

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self.tensors)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.tensors]

    def position(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise UnknownTensorError(f"tensor {name!r} is not in the manifest") from None

    def __getitem__(self, name: str) -> TensorMeta:
        return self.tensors[self.position(name)]

    def __len__(self) -> int:
        return len(self.tensors)

    def bytes_before(self, point: ResumePoint) -> int:
        """Bytes a transfer holds when it resumes at ``point``."""
        if point.at_start:
            return 0
        if point.at_end:
            return self.total_bytes
        i = self.position(point.tensor)
        return sum(m.nbytes for m in self.tensors[:i]) + point.offset


@dataclass(frozen=True)
class ResumePoint:
    """The first byte not yet received: tensors before ``tensor`` (in manifest order) are complete.

    ``tensor == ""`` means from the beginning; :data:`END` (tensor ``"\\0end"``) means nothing is left.
    """

    tensor: str = ""
    offset: int = 0

    @property
    def at_start(self) -> bool:
        return self.tensor == ""

    @property
    def at_end(self) -> bool:
        return self.tensor == _END_NAME


_END_NAME = "\0end"
START = ResumePoint()
END = ResumePoint(_END_NAME, 0)


@dataclass(frozen=True)
class Chunk:
    tensor: str
    offset: int
    data: bytes


# ----------------------------------------------------------------------------------------------------- encoding


def to_wire(tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """``tensor`` converted to the wire dtype, on CPU, contiguous (no copy when it already is all of these)."""
    target = WIRE_DTYPES[wire_dtype_name(dtype)]
    if not tensor.is_floating_point():
        raise WireError(f"only floating-point tensors travel on the wire; got {tensor.dtype}")
    return tensor.detach().to(device="cpu", dtype=target).contiguous()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor as a zero-copy, read-only memoryview."""
    if not tensor.is_contiguous() or tensor.device.type != "cpu":
        raise WireError("tensor_bytes needs a contiguous CPU tensor; call to_wire first")
    if tensor.numel() == 0:
        return memoryview(b"")
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat.numpy().data.toreadonly()


def from_wire(data: Any, meta: TensorMeta) -> torch.Tensor:
    """A tensor of ``meta``'s dtype and shape over ``data`` (a writable buffer: shared, not copied)."""
    dtype = WIRE_DTYPES[meta.dtype]
    if len(memoryview(data)) != meta.nbytes:
        raise WireError(f"tensor {meta.name!r}: got {len(memoryview(data))} bytes, manifest says {meta.nbytes}")
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(meta.shape)


def sha256_of(buffers: Iterable[Any]) -> bytes:
    digest = hashlib.sha256()
    for buf in buffers:
        digest.update(buf)
    return digest.digest()


def describe(name: str, wire_tensor: torch.Tensor) -> TensorMeta:
    """The manifest entry of a tensor already in its wire dtype (hashes its bytes once)."""
    data = tensor_bytes(wire_tensor)
    return TensorMeta(
        name=name,
        dtype=wire_dtype_name(wire_tensor.dtype),
        shape=tuple(int(d) for d in wire_tensor.shape),
        nbytes=len(data),
        sha256=hashlib.sha256(data).digest(),
    )


@dataclass(frozen=True)
class WirePayload:
    """Tensors in their wire dtype plus their manifest: what a sender streams (and a slice cache holds)."""

    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], dtype: str, names: Sequence[str] | None = None) -> WirePayload:
        """Convert ``state`` (any float dtype) to ``dtype``, tensor by tensor, and describe it."""
        wire: dict[str, torch.Tensor] = {}
        metas = []
        for name in names if names is not None else list(state):
            t = to_wire(state[name], dtype)
            wire[name] = t
            metas.append(describe(name, t))
        return cls(Manifest(tuple(metas)), wire)

    def source(self, meta: TensorMeta) -> memoryview:
        return tensor_bytes(self.tensors[meta.name])

    @property
    def nbytes(self) -> int:
        return self.manifest.total_bytes


def iter_chunks(
    manifest: Manifest,
    source: Callable[[TensorMeta], Any],
    start: ResumePoint = START,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[Chunk]:
    """Chunks of at most ``chunk_bytes`` from ``start`` to the end, tensor by tensor.

    ``source(meta)`` returns a buffer of ``meta.nbytes`` wire bytes; it is called once per tensor sent, so a sender
    can produce tensors lazily. Zero-length tensors produce no chunk (the receiver completes them by itself).
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes is {chunk_bytes}; it must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}")
    first, offset = _resume_index(manifest, start)
    for meta in manifest.tensors[first:]:
        if meta.nbytes > offset:
            buf = memoryview(source(meta)).cast("B")
            if len(buf) != meta.nbytes:
                raise WireError(f"tensor {meta.name!r}: source gave {len(buf)} bytes, manifest says {meta.nbytes}")
            for pos in range(offset, meta.nbytes, chunk_bytes):
                yield Chunk(meta.name, pos, bytes(buf[pos : pos + chunk_bytes]))
            del buf
        offset = 0


def _resume_index(manifest: Manifest, start: ResumePoint) -> tuple[int, int]:
    if start.at_start:
        return 0, 0
    if start.at_end:
        return len(manifest), 0
    i = manifest.position(start.tensor)
    meta = manifest.tensors[i]
    if not 0 <= start.offset <= meta.nbytes:
        raise WireError(f"resume offset {start.offset} is outside tensor {meta.name!r} of {meta.nbytes} bytes")
    return i, start.offset


# ----------------------------------------------------------------------------------------------------- decoding


class TensorSink(Protocol):
    """Where a Reassembler puts bytes. Offsets arrive in increasing order within a tensor."""

    def write(self, meta: TensorMeta, offset: int, data: bytes) -> None: ...

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

    def write(self, meta: TensorMeta, offset: int, data: bytes) -> None:
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

    def write(self, meta: TensorMeta, offset: int, data: bytes) -> None:
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
        self._i, self._offset = _resume_index(manifest, start)
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

    def accept(self, tensor: str, offset: int, data: bytes) -> TensorMeta | None:
        """Take one chunk; returns the tensor's meta when this chunk completed (and verified) it."""
        if self.done:
            raise OverlongError(f"chunk for tensor {tensor!r} arrived after the transfer was complete")
        pos = self.manifest.position(tensor)  # UnknownTensorError
        meta = self.manifest.tensors[self._i]
        if pos != self._i or offset != self._offset:
            raise OutOfOrderError(
                f"chunk ({tensor!r}, offset {offset}) is out of order; expected ({meta.name!r}, offset {self._offset})"
            )
        if not data:
            raise WireError(f"empty chunk for tensor {tensor!r} at offset {offset}")
        end = offset + len(data)
        if end > meta.nbytes:
            raise OverlongError(
                f"chunk for tensor {tensor!r} ends at byte {end}, past the tensor's {meta.nbytes} bytes"
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
                f"transfer ended at tensor {point.tensor!r} offset {point.offset}; "
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
                    f"tensor {meta.name!r}: sha256 of the {meta.nbytes} received bytes does not match the manifest;"
                    " resend it from offset 0"
                )
            self.sink.complete(meta)
            last = meta
            self._complete_bytes += meta.nbytes
            self._i += 1
            self._offset = 0
            self._hash = hashlib.sha256()
        return last


# ----------------------------------------------------------------------------------------------------- protobuf


def manifest_to_proto(manifest: Manifest, **fields: Any) -> Any:
    """A ``raffm.v1.Manifest`` for ``manifest``; extra keyword fields (model_version, spec, ...) are set as given."""
    from raffm.v1 import common_pb2

    msg = common_pb2.Manifest(
        tensors=[
            common_pb2.TensorInfo(name=m.name, dtype=m.dtype, shape=list(m.shape), nbytes=m.nbytes, sha256=m.sha256)
            for m in manifest.tensors
        ],
        total_bytes=manifest.total_bytes,
        **fields,
    )
    return msg


def manifest_from_proto(msg: Any) -> Manifest:
    """Decode and check a ``raffm.v1.Manifest`` (ManifestError names the bad tensor)."""
    metas = tuple(
        TensorMeta(name=t.name, dtype=t.dtype, shape=tuple(int(d) for d in t.shape), nbytes=int(t.nbytes),
                   sha256=bytes(t.sha256))
        for t in msg.tensors
    )
    manifest = Manifest(metas)
    if msg.total_bytes and msg.total_bytes != manifest.total_bytes:
        raise ManifestError(f"manifest total_bytes is {msg.total_bytes}; its tensors add up to {manifest.total_bytes}")
    return manifest


def resume_from_proto(msg: Any) -> ResumePoint:
    return ResumePoint(msg.tensor, int(msg.offset)) if msg is not None and msg.tensor else START


def resume_to_proto(point: ResumePoint) -> Any:
    from raffm.v1 import common_pb2

    return common_pb2.ResumePoint(tensor=point.tensor, offset=point.offset)


def spec_to_proto(spec: Any) -> Any:
    """``raffm.spec.ElasticSpec`` -> ``raffm.v1.ElasticSpec``."""
    from raffm.v1 import common_pb2

    return common_pb2.ElasticSpec(
        hidden=spec.hidden,
        layers=[common_pb2.LayerSpec(heads=l.heads, head_dim=l.head_dim, ffn=l.ffn) for l in spec.layers],
    )


def spec_from_proto(msg: Any) -> Any:
    """``raffm.v1.ElasticSpec`` -> ``raffm.spec.ElasticSpec`` (not validated against a model here)."""
    from raffm.spec import ElasticSpec, LayerSpec

    return ElasticSpec(hidden=int(msg.hidden),
                       layers=tuple(LayerSpec(int(l.heads), int(l.head_dim), int(l.ffn)) for l in msg.layers))
