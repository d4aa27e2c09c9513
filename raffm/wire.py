"""The tensor wire codec: the wire-dtype vocabulary, manifests, resume points and chunking (pure; no network, no files).

A transfer is a :class:`Manifest` (per tensor: name, wire dtype, shape, byte length, sha256 of the wire bytes)
followed by chunks ``(tensor, offset, data)`` in manifest order, each tensor's bytes in increasing offset. Bytes are
the little-endian C-order buffer of the tensor converted to the wire dtype. Everything is streamed tensor by tensor:
no function here concatenates a whole model into one ``bytes`` object, so totals above 2 GiB are fine.

Wire dtypes have one vocabulary end to end: ``float32``, ``float16``, ``bfloat16`` (torch's names). Manifests,
tickets, job settings, metrics labels and the cost model all use them; ``fp32``/``fp16``/``bf16`` are accepted as
input spellings and normalised by :func:`wire_dtype_name`. The receiving side (sinks and the reassembler) is
:mod:`raffm.reassembly`; the mapping to and from protobuf messages is :mod:`raffm.proto`.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from raffm.errors import excerpt

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = MiB
# Chunks are capped well below the chassis' 64 MiB message limit (framing counts against the limit).
MAX_CHUNK_BYTES = 16 * MiB
MIN_CHUNK_BYTES = 1024

# Wire dtype name <-> torch dtype: the one vocabulary. Names are what TensorInfo.dtype carries.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Other spellings accepted on input (flags, job files, function arguments).
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


def wire_dtype_name(value: str | torch.dtype | None) -> str:
    """The vocabulary's name of a wire dtype given as a name, an alias (``fp16``...) or a torch dtype."""
    if value is None:
        return "float32"
    if isinstance(value, torch.dtype):
        for name, dtype in WIRE_DTYPES.items():
            if dtype == value:
                return name
        raise WireError(f"torch dtype {value} is not a wire dtype; use one of {', '.join(WIRE_DTYPES)}")
    name = _ALIASES.get(value.lower(), value.lower())
    if name not in WIRE_DTYPES:
        raise WireError(f"wire dtype {excerpt(value)} is unknown; use one of {', '.join(WIRE_DTYPES)} (or fp32, fp16, bf16)")
    return name


def torch_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype of a wire dtype name or alias."""
    return WIRE_DTYPES[wire_dtype_name(value)]


def itemsize(dtype_name: str) -> int:
    """Bytes per element of a wire dtype name or alias."""
    return torch_dtype(dtype_name).itemsize


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
            raise ManifestError(f"tensor {excerpt(self.name)} has dtype {excerpt(self.dtype)}; expected one of {list(WIRE_DTYPES)}")
        if any(d < 0 for d in self.shape):
            raise ManifestError(f"tensor {excerpt(self.name)} has a negative dimension in shape {self.shape}")
        expected = math.prod(self.shape) * itemsize(self.dtype)
        if self.nbytes != expected:
            raise ManifestError(
                f"tensor {excerpt(self.name)}: nbytes is {self.nbytes} but shape {self.shape} in {self.dtype} is {expected}"
            )
        if len(self.sha256) != 32:
            raise ManifestError(f"tensor {excerpt(self.name)}: sha256 must be 32 bytes, got {len(self.sha256)}")


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
                raise ManifestError(f"tensor {excerpt(meta.name)} appears twice in the manifest")
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
            raise UnknownTensorError(f"tensor {excerpt(name)} is not in the manifest") from None

    def __getitem__(self, name: str) -> TensorMeta:
        return self.tensors[self.position(name)]

    def __len__(self) -> int:
        return len(self.tensors)

    def locate(self, point: ResumePoint) -> tuple[int, int]:
        """(index of the tensor, byte offset in it) where a transfer resuming at ``point`` continues."""
        if point.at_start:
            return 0, 0
        if point.at_end:
            return len(self.tensors), 0
        i = self.position(point.tensor)
        meta = self.tensors[i]
        if not 0 <= point.offset <= meta.nbytes:
            raise WireError(f"resume offset {point.offset} is outside tensor {excerpt(meta.name)} of {meta.nbytes} bytes")
        return i, point.offset

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


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one tensor's wire bytes: ``data`` starts at byte ``offset`` of tensor ``tensor``; a view of the
    sender's or the received buffer, not a copy."""

    tensor: str
    offset: int
    data: bytes | memoryview


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
        raise WireError(f"tensor {excerpt(meta.name)}: got {len(memoryview(data))} bytes, manifest says {meta.nbytes}")
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
    def from_state(cls, state: Mapping[str, torch.Tensor], dtype: str, names: Sequence[str] | None = None, *,
                   dtypes: Mapping[str, str] | None = None) -> WirePayload:
        """Convert ``state`` (any float dtype) to ``dtype`` (``dtypes[name]`` where given), tensor by tensor, and
        describe it."""
        wire: dict[str, torch.Tensor] = {}
        metas = []
        for name in names if names is not None else list(state):
            t = to_wire(state[name], (dtypes or {}).get(name, dtype))
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
    *,
    skip: Collection[bytes] = (),
) -> Iterator[Chunk]:
    """Chunks of at most ``chunk_bytes`` from ``start`` to the end, tensor by tensor.

    ``source(meta)`` returns a buffer of ``meta.nbytes`` wire bytes; it is called once per tensor sent, so a sender
    can produce tensors lazily. Zero-length tensors produce no chunk (the receiver completes them by itself), nor do
    tensors whose sha256 is in ``skip`` (the receiver holds them already).
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise WireError(f"chunk_bytes is {chunk_bytes}; it must be between {MIN_CHUNK_BYTES} and {MAX_CHUNK_BYTES}")
    first, offset = manifest.locate(start)
    for meta in manifest.tensors[first:]:
        if meta.nbytes > offset and meta.sha256 not in skip:
            buf = memoryview(source(meta)).cast("B")
            if len(buf) != meta.nbytes:
                raise WireError(f"tensor {excerpt(meta.name)}: source gave {len(buf)} bytes, manifest says {meta.nbytes}")
            for pos in range(offset, meta.nbytes, chunk_bytes):
                yield Chunk(meta.name, pos, buf[pos : pos + chunk_bytes])
            del buf
        offset = 0
