"""Durable staging of uploads: one directory per ticket holding one data file, resumable across restarts.

Layout: ``<root>/<round_id>/<ticket_id>/`` holds ``manifest.json``, ``data`` (preallocated to the manifest's total
size; every tensor at its manifest offset, the bytes of the tensors before it) and ``progress`` (a 40-byte record: how
many leading tensors are complete and sha256-verified, and how many bytes of the next one are written, bound to the
manifest by a digest and checked by a CRC). Tensors arrive in manifest order, so that pair is the whole state of an
upload: the resume point is read from it. A committed update is read back as tensors memory-mapped from ``data``, so
validating and folding a multi-GB update does not copy it into anonymous memory.

Durability: the chunks are written to the OS as they arrive (a process kill loses nothing written) and the progress
record is updated after each write, never ahead of the bytes. With a background syncer the data file's writeback is
started every ``_WRITEBACK_BYTES`` (an fsync in the syncer's thread, one at a time per upload, never on the receiving
thread), so the disk writes while the network delivers and the commit's fsync finds little left (staging alone 1.1-1.4x
as fast, bench/results/2026-12-02.md). The durability point is the commit: :meth:`StagedUpload.sync` makes the data
file, the record, the manifest and the directory durable, once per upload. Staging a BERT-sized update as one file per
tensor with one fsync each ran at a quarter of the disk's speed; the number of fsyncs, not the bytes, was the cost.
After a restart (or a power loss before the commit) the record may claim tensors whose bytes never reached the disk, so
the complete tensors a process did not verify itself are hashed again against the manifest the first time the upload is
looked at, and the first that does not match is received again.

An upload staged by the previous layout (one ``NNNNN.part``/``NNNNN.bin`` file per tensor) is read back when it was
committed (its files were fsynced then); an uncommitted one is dropped when first looked at, so its device sends it
again from the start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import torch

from raffm.checkpoints import fsync_dir
from raffm.wire import END, START, WIRE_DTYPES, Manifest, ManifestError, ResumePoint, TensorMeta

_READ_BLOCK = 4 << 20
_WRITEBACK_BYTES = 16 << 20  # 4-64 MiB measured alike; fewer fsyncs than 4, earlier starts than 64
MANIFEST, DATA, PROGRESS = "manifest.json", "data", "progress"

# magic, manifest digest, complete tensors, bytes of the next tensor written; then a CRC32 of those fields
_RECORD = struct.Struct("<8s16sIQ")
_MAGIC = b"RAFFMST1"
_RECORD_SIZE = _RECORD.size + 4


def _manifest_json(manifest: Manifest) -> str:
    return json.dumps({"tensors": [{"name": m.name, "dtype": m.dtype, "shape": list(m.shape), "nbytes": m.nbytes,
                                    "sha256": m.sha256.hex()} for m in manifest.tensors]})


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()[:16]


class StagedUpload:
    """The staging directory of one ticket's upload; also the :class:`raffm.reassembly.TensorSink` it is received
    into (one stream at a time writes it; any thread may ask where it stands)."""

    def __init__(self, root: Path, round_id: str, ticket_id: str, *, syncer: Executor | None = None,
                 verified: _Verified | None = None) -> None:
        self.dir = root / round_id / ticket_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._manifest: Manifest | None = None
        self._key = b""  # digest of the manifest's JSON: a progress record of another manifest is not this one's
        self._offsets: list[int] = []
        self._data_fd: int | None = None
        self._record_fd: int | None = None
        self._syncer = syncer  # None: the data file is fsynced in line at the commit
        self._verified = verified if verified is not None else _Verified()
        self._pending: Future[None] | None = None
        self._writeback: Future[None] | None = None  # the running early fsync of the data file, if any
        self._unsynced = 0  # bytes written since the last one started

    # -- manifest ---------------------------------------------------------------------------------------------------

    def load_manifest(self) -> Manifest | None:
        try:
            text = (self.dir / MANIFEST).read_text(encoding="utf-8")
            data = json.loads(text)
            manifest = Manifest(tuple(
                TensorMeta(t["name"], t["dtype"], tuple(t["shape"]), t["nbytes"], bytes.fromhex(t["sha256"]))
                for t in data["tensors"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # torn by a power loss before the commit made it durable
            return None
        self._set_manifest(manifest, text)
        return manifest

    def _set_manifest(self, manifest: Manifest, text: str) -> None:
        self._manifest, self._key = manifest, _digest(text)
        self._offsets, at = [], 0
        for m in manifest.tensors:
            self._offsets.append(at)
            at += m.nbytes

    def save_manifest(self, manifest: Manifest) -> None:
        """Record the manifest and preallocate the data file; a resumed upload must send the same manifest (else its
        staged bytes are dropped). Not fsynced here: :meth:`sync` makes it durable with the rest."""
        self._drop_legacy()
        old = self.load_manifest()
        if old is not None and old != manifest:
            self.reset()
            old = None
        text = _manifest_json(manifest)
        if old is None:
            for name in (PROGRESS, DATA):  # first the record: a crash leaves no record for another manifest's bytes
                (self.dir / name).unlink(missing_ok=True)
            tmp = self.dir / f".{MANIFEST}.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.dir / MANIFEST)
        self._set_manifest(manifest, text)
        fd = self._data()
        if os.fstat(fd).st_size < manifest.total_bytes:
            _preallocate(fd, manifest.total_bytes)
        if old is None or self._read_record() is None:
            self._write_record(0, 0)

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None and self.load_manifest() is None:
            raise ManifestError("no manifest has been received for this upload")
        assert self._manifest is not None
        return self._manifest

    # -- where the upload stands ------------------------------------------------------------------------------------

    def _progress(self) -> tuple[int, int]:
        """(complete tensors, bytes of the next one held), the complete ones verified: those this process did not
        receive itself are hashed again, and the first that does not match is dropped with everything after it."""
        record = self._read_record()
        if record is None:
            return 0, 0
        complete, partial = record
        verified = self._verified.count(self.dir)
        if complete > verified:
            good = verified
            while good < complete and self._matches(good):
                good += 1
            if good < complete:
                complete, partial = good, 0
                self._write_record(complete, partial)
            self._verified.set(self.dir, complete)
        return complete, partial

    def _matches(self, i: int) -> bool:
        meta = self.manifest.tensors[i]
        digest = hashlib.sha256()
        for block in self._read(self._offsets[i], meta.nbytes):
            digest.update(block)
        return digest.digest() == meta.sha256

    def resume_point(self) -> ResumePoint:
        """Where the sender continues; START when nothing is staged, END when every tensor is complete."""
        self._drop_legacy()
        if self.load_manifest() is None:
            return START
        complete, partial = self._progress()
        if complete >= len(self.manifest):
            return END
        meta = self.manifest.tensors[complete]
        return ResumePoint(meta.name, min(partial, meta.nbytes))

    def complete_tensors(self) -> list[str]:
        if self.load_manifest() is None:
            return []
        return self.manifest.names[: self._progress()[0]]

    def bytes_held(self) -> int:
        point = self.resume_point()
        return 0 if self._manifest is None else self.manifest.bytes_before(point)

    # -- TensorSink ---------------------------------------------------------------------------------------------------

    def write(self, meta: TensorMeta, offset: int, data: bytes | memoryview) -> None:
        i = self.manifest.position(meta.name)
        _pwrite_all(self._data(), data, self._offsets[i] + offset)
        self._write_record(i, offset + len(data))  # after the bytes: the record never claims what is not written
        self._unsynced += len(data)
        if (self._syncer is not None and self._unsynced >= _WRITEBACK_BYTES
                and (self._writeback is None or self._writeback.done())):
            self._writeback, self._unsynced = self._syncer.submit(_fsync_path, self.dir / DATA), 0

    def complete(self, meta: TensorMeta) -> None:
        i = self.manifest.position(meta.name)
        self._verified.set(self.dir, i + 1)
        self._write_record(i + 1, 0)
        # Opened again for the next tensor: an upload whose round ended (and took its directory) fails there with
        # FileNotFoundError, instead of writing on into a deleted file.
        self.flush()
        if i + 1 == len(self.manifest) and self._syncer is not None:
            # The last tensor is in: start the data file's fsync while the commit validates the update.
            self._pending = self._syncer.submit(_fsync_path, self.dir / DATA)

    def discard(self, meta: TensorMeta) -> None:
        self._write_record(self.manifest.position(meta.name), 0)

    def received(self, meta: TensorMeta) -> Iterator[bytes]:
        i = self.manifest.position(meta.name)
        record = self._read_record()
        if record is None or record[0] != i:
            return
        yield from self._read(self._offsets[i], min(record[1], meta.nbytes))

    def flush(self) -> None:
        """Close the files (every chunk is already with the OS: a process kill loses none of it)."""
        for fd in (self._data_fd, self._record_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._record_fd = None

    # -- committed updates ----------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Make the staged upload durable: the data file, its progress record, the manifest and the directory
        entries (one fsync each, once per upload)."""
        pending, self._pending = self._pending, None
        self.flush()
        if pending is not None:
            pending.result()
        else:
            _fsync_path(self.dir / DATA, missing_ok=False)
        for name in (PROGRESS, MANIFEST):
            _fsync_path(self.dir / name, missing_ok=False)
        fsync_dir(self.dir)
        fsync_dir(self.dir.parent)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The staged tensors, memory-mapped read-only (copy-on-write) from the data file (wire dtype, manifest
        shapes)."""
        if not (self.dir / DATA).exists() and any(self.dir.glob("*.bin")):
            return self._legacy_tensors()
        manifest = self.manifest
        if not (self.dir / DATA).exists():  # torch would say RuntimeError; the caller tells a vanished round by OSError
            raise FileNotFoundError(f"staged upload {self.dir} has no data file")
        flat = (torch.from_file(str(self.dir / DATA), shared=False, size=manifest.total_bytes, dtype=torch.uint8)
                if manifest.total_bytes else torch.empty(0, dtype=torch.uint8))
        out: dict[str, torch.Tensor] = {}
        for meta, at in zip(manifest.tensors, self._offsets, strict=True):
            dtype = WIRE_DTYPES[meta.dtype]
            view = flat[at : at + meta.nbytes]
            if at % dtype.itemsize:  # never for one wire dtype; a mixed manifest's tensor is copied to align it
                view = view.clone()
            out[meta.name] = view.view(dtype).reshape(meta.shape)
        return out

    def _legacy_tensors(self) -> dict[str, torch.Tensor]:
        """A committed upload staged by the previous layout, one fsynced ``NNNNN.bin`` per tensor."""
        out: dict[str, torch.Tensor] = {}
        for i, meta in enumerate(self.manifest.tensors):
            dtype, numel = WIRE_DTYPES[meta.dtype], meta.nbytes // WIRE_DTYPES[meta.dtype].itemsize
            if numel == 0:
                out[meta.name] = torch.empty(meta.shape, dtype=dtype)
                continue
            t = torch.from_file(str(self.dir / f"{i:05d}.bin"), shared=False, size=numel, dtype=dtype)
            out[meta.name] = t.reshape(meta.shape)
        return out

    def _drop_legacy(self) -> None:
        """An uncommitted upload in the previous layout cannot be resumed: drop it (its device starts over)."""
        if not (self.dir / PROGRESS).exists() and any(p.suffix in (".bin", ".part") for p in self.dir.iterdir()):
            self.reset()

    def reset(self) -> None:
        self.flush()
        self._pending = None  # an fsync still running finds its file gone, and that is fine
        self._verified.forget(self.dir)
        (self.dir / PROGRESS).unlink(missing_ok=True)  # first: no record may outlive its data
        for p in self.dir.iterdir():
            p.unlink()
        self._manifest, self._key, self._offsets = None, b"", []

    def remove(self) -> None:
        self.flush()
        self._pending = None
        self._verified.forget(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- files --------------------------------------------------------------------------------------------------------

    def _data(self) -> int:
        if self._data_fd is None:
            self._data_fd = os.open(self.dir / DATA, os.O_RDWR | os.O_CREAT, 0o644)
        return self._data_fd

    def _read(self, at: int, nbytes: int) -> Iterator[bytes]:
        with open(self.dir / DATA, "rb") as f:
            f.seek(at)
            while nbytes > 0:
                block = f.read(min(_READ_BLOCK, nbytes))
                if not block:
                    return
                nbytes -= len(block)
                yield block

    def _write_record(self, complete: int, partial: int) -> None:
        if self._record_fd is None:
            self._record_fd = os.open(self.dir / PROGRESS, os.O_RDWR | os.O_CREAT, 0o644)
        fields = _RECORD.pack(_MAGIC, self._key, complete, partial)
        _pwrite_all(self._record_fd, fields + struct.pack("<I", zlib.crc32(fields)), 0)

    def _read_record(self) -> tuple[int, int] | None:
        """The progress record, or None when it is missing, torn, of another manifest, or past the data file."""
        try:
            with open(self.dir / PROGRESS, "rb") as f:
                raw = f.read(_RECORD_SIZE)
            size = os.stat(self.dir / DATA).st_size
        except FileNotFoundError:
            return None
        if len(raw) != _RECORD_SIZE or zlib.crc32(raw[: _RECORD.size]) != struct.unpack("<I", raw[_RECORD.size :])[0]:
            return None
        magic, key, complete, partial = _RECORD.unpack(raw[: _RECORD.size])
        if magic != _MAGIC or key != self._key or complete > len(self._offsets) or size < self.manifest.total_bytes:
            return None
        return complete, partial


def _pwrite_all(fd: int, data: bytes | memoryview, at: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _preallocate(fd: int, nbytes: int) -> None:
    """Reserve the data file's blocks now, so a full disk refuses the upload at its manifest, not halfway."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a file system without fallocate
            raise
        os.ftruncate(fd, nbytes)


def _fsync_path(path: Path, missing_ok: bool = True) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # the upload was reset or removed meanwhile
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Verified:
    """How many leading tensors of each upload directory this process received and verified (or hashed again after
    a restart); thread-safe."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, int] = {}
        self._lock = threading.Lock()

    def count(self, directory: Path) -> int:
        with self._lock:
            return self._by_dir.get(directory, 0)

    def set(self, directory: Path, count: int) -> None:
        with self._lock:
            self._by_dir[directory] = count

    def forget(self, directory: Path) -> None:
        """Drop every entry under ``directory`` (an upload's, or a round's)."""
        with self._lock:
            for d in [d for d in self._by_dir if d == directory or directory in d.parents]:
                del self._by_dir[d]


class Staging:
    """All staged uploads under one directory."""

    def __init__(self, root: str | os.PathLike[str], *, fsync_threads: int = 2) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Shared by every upload; its threads start on first use and end with the process.
        self._syncer = ThreadPoolExecutor(fsync_threads, thread_name_prefix="staging-fsync") if fsync_threads else None
        self._verified = _Verified()

    def upload(self, round_id: str, ticket_id: str) -> StagedUpload:
        return StagedUpload(self.root, round_id, ticket_id, syncer=self._syncer, verified=self._verified)

    def exists(self, round_id: str, ticket_id: str) -> bool:
        return (self.root / round_id / ticket_id).is_dir()

    def path(self, round_id: str, ticket_id: str) -> Path:
        return self.root / round_id / ticket_id

    def drop_round(self, round_id: str, keep: set[str] | None = None) -> None:
        """Remove a finished round's uncommitted uploads (``keep``: ticket ids to leave in place)."""
        base = self.root / round_id
        if not base.is_dir():
            return
        for d in base.iterdir():
            if keep is None or d.name not in keep:
                self._verified.forget(d)
                shutil.rmtree(d, ignore_errors=True)
