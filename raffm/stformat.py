"""The safetensors file format, streamed: serialise a state tensor by tensor, and read tensors (or leading prefixes of
them) back from any source of byte ranges (a file, an object store), never the whole file unless asked.

A safetensors file is an 8-byte little-endian header length N, an N-byte JSON header (per tensor: dtype, shape and
``data_offsets`` relative to the data section), then the raw little-endian tensor bytes. Tensors are row-major, so
a *leading prefix* of a tensor (its first n elements) is one contiguous byte range: a sub-model that keeps leading
blocks (``raffm.slicing``) needs only such prefixes, never the unrelated tail of a tensor nor tensors it drops.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own bound


class FormatError(ValueError):
    """The bytes are not a safetensors file this reader understands."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in the file: ``[start, end)`` are absolute file offsets."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in memory order (a view where the tensor is contiguous on the CPU, else one copy)."""
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data


@dataclass(frozen=True)
class Serialized:
    """A state laid out as a safetensors file: the header (length prefix included) and the tensors in file order."""

    head: bytes
    tensors: tuple[tuple[str, torch.Tensor], ...]
    nbytes: int

    def pieces(self) -> Iterator[memoryview]:
        """The file's bytes, piece by piece (the header, then one view per tensor): nothing is copied twice."""
        yield memoryview(self.head)
        for _, t in self.tensors:
            data = raw_bytes(t)
            if len(data):
                yield data

    def sha256(self) -> str:
        """The sha256 (hex) of the whole file, computed without writing it anywhere."""
        digest = hashlib.sha256()
        for piece in self.pieces():
            digest.update(piece)
        return digest.hexdigest()


def serialize(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Serialized:
    """Lay out ``state`` as a safetensors file (tensors in insertion order, data section 8-byte aligned)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    tensors = []
    for name, t in state.items():
        if t.dtype not in ST_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
        tensors.append((name, t))
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    prefixed = struct.pack("<Q", len(head)) + head
    return Serialized(prefixed, tuple(tensors), len(prefixed) + offset)


def parse_header(head: bytes, data_start: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensor entries (absolute offsets) and the metadata of a header that starts the data at ``data_start``."""
    try:
        raw = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise FormatError("safetensors header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    for name, e in raw.items():
        try:
            dtype = TORCH_DTYPES[e["dtype"]]
            begin, end = (int(x) for x in e["data_offsets"])
            shape = tuple(int(d) for d in e["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"safetensors header entry {name!r} is malformed or has an unsupported dtype: "
                              f"{exc}") from None
        entry = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
        if end - begin != entry.numel * entry.itemsize:
            raise FormatError(f"tensor {name!r}: {end - begin} bytes for shape {shape} of {dtype}")
        entries[name] = entry
    return entries, {str(k): str(v) for k, v in metadata.items()}


# A source of bytes: read ``[start, start + len(out))`` into ``out`` (a writable byte buffer), fully.
RangeReader = Callable[[int, memoryview], None]


@dataclass(frozen=True)
class _Range:
    start: int
    end: int
    parts: tuple[tuple[str, int, int], ...]  # (tensor name, file offset, bytes)


class SafetensorsReader:
    """Reads tensors, or leading prefixes of them, from a safetensors file through a :data:`RangeReader`.

    Requests close together are coalesced into one ranged read (``gap_bytes``), and reads run on ``workers``
    threads: an object store serves many ranges of one object in parallel.
    """

    def __init__(self, read_range: RangeReader, *, gap_bytes: int = 0, max_read_bytes: int = 64 << 20,
                 workers: int = 1) -> None:
        self._read = read_range
        self.gap_bytes, self.max_read_bytes, self.workers = gap_bytes, max_read_bytes, workers
        size = bytearray(8)
        read_range(0, memoryview(size))
        (n,) = struct.unpack("<Q", bytes(size))
        if n > MAX_HEADER_BYTES:
            raise FormatError(f"safetensors header of {n} bytes is larger than {MAX_HEADER_BYTES}")
        head = bytearray(n)
        read_range(8, memoryview(head))
        self.entries, self.metadata = parse_header(bytes(head), 8 + n)

    def read(self, wanted: Mapping[str, int | None]) -> dict[str, torch.Tensor]:
        """``name -> n``: the first ``n`` elements of the tensor (``None``: all of it), each as a 1-D tensor of the
        stored dtype. Only those bytes are read."""
        out: dict[str, torch.Tensor] = {}
        ranges: list[tuple[int, int, str]] = []
        for name, n in wanted.items():
            entry = self.entries.get(name)
            if entry is None:
                raise KeyError(f"tensor {name!r} is not in this checkpoint")
            count = entry.numel if n is None else n
            if not 0 <= count <= entry.numel:
                raise ValueError(f"tensor {name!r} has {entry.numel} elements; asked for the first {count}")
            out[name] = torch.empty(count, dtype=entry.dtype)
            if count:
                ranges.append((entry.start, count * entry.itemsize, name))
        buffers = {name: out[name].view(torch.uint8).numpy().data for name in out if out[name].numel()}
        jobs = self._coalesce(sorted(ranges))

        def run(r: _Range) -> None:
            if len(r.parts) == 1:
                name, _, _ = r.parts[0]
                self._read(r.start, buffers[name])
                return
            block = bytearray(r.end - r.start)
            self._read(r.start, memoryview(block))
            for name, offset, nbytes in r.parts:
                buffers[name][:] = block[offset - r.start: offset - r.start + nbytes]

        if self.workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(min(self.workers, len(jobs)), thread_name_prefix="st-read") as pool:
                list(pool.map(run, jobs))
        else:
            for job in jobs:
                run(job)
        return out

    def tensors(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors, shaped (every tensor when ``names`` is None)."""
        names = list(self.entries) if names is None else names
        flat = self.read({n: None for n in names})
        return {n: flat[n].reshape(self.entries[n].shape) for n in names}

    def _coalesce(self, ranges: list[tuple[int, int, str]]) -> list[_Range]:
        out: list[_Range] = []
        for start, nbytes, name in ranges:
            last = out[-1] if out else None
            if (last is not None and start - last.end <= self.gap_bytes
                    and start + nbytes - last.start <= self.max_read_bytes):
                out[-1] = _Range(last.start, max(last.end, start + nbytes), (*last.parts, (name, start, nbytes)))
            else:
                out.append(_Range(start, start + nbytes, ((name, start, nbytes),)))
        return out

