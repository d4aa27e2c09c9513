"""Durable staging of uploads: one directory per ticket, one file per tensor, resumable across restarts.

Layout: ``<root>/<round_id>/<ticket_id>/manifest.json`` and ``NNNNN.part`` (being received) / ``NNNNN.bin``
(complete, sha256 verified). The resume point of an interrupted upload is the first tensor without a ``.bin`` and the
size of its ``.part``. A committed update is read back as tensors memory-mapped from the ``.bin`` files, so
validating and folding a multi-GB update does not copy it into anonymous memory.

Durability: a ``.bin`` is fsynced in the background as soon as it is complete (on a small pool shared by every
upload), while the next tensors arrive; :meth:`StagedUpload.sync` waits for those fsyncs and the directory's before
the commit, so an acknowledged update is on disk. The receiving thread never waits for the disk: fsync per tensor in
line cost the upload about a fifth of its throughput. A ``.bin`` this process did not verify (an upload interrupted
before a restart, whose fsync may not have happened before a power loss) is hashed again against its manifest entry
the first time its upload is looked at, and dropped (to be sent again) when it does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from raffm.checkpoints import atomic_write_text, fsync_dir
from raffm.wire import END, START, WIRE_DTYPES, Manifest, ManifestError, ResumePoint, TensorMeta

_READ_BLOCK = 4 << 20


class StagedUpload:
    """The staging directory of one ticket's upload; also the :class:`raffm.reassembly.TensorSink` it is received
    into."""

    def __init__(self, root: Path, round_id: str, ticket_id: str, *, syncer: Executor | None = None,
                 verified: _Verified | None = None) -> None:
        self.dir = root / round_id / ticket_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._manifest: Manifest | None = None
        self._handle: tuple[str, Any] | None = None
        self._syncer = syncer  # None: fsync each .bin in line, as it completes
        self._verified = verified if verified is not None else _Verified()
        self._pending: dict[Path, Future[None]] = {}

    # -- manifest ---------------------------------------------------------------------------------------------------

    def load_manifest(self) -> Manifest | None:
        path = self.dir / "manifest.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        self._manifest = Manifest(tuple(
            TensorMeta(t["name"], t["dtype"], tuple(t["shape"]), t["nbytes"], bytes.fromhex(t["sha256"]))
            for t in data["tensors"]
        ))
        return self._manifest

    def save_manifest(self, manifest: Manifest) -> None:
        """Record the manifest; a resumed upload must send the same one (else its staged bytes are dropped)."""
        old = self.load_manifest()
        if old is not None and old != manifest:
            self.reset()
        data = {"tensors": [{"name": m.name, "dtype": m.dtype, "shape": list(m.shape), "nbytes": m.nbytes,
                             "sha256": m.sha256.hex()} for m in manifest.tensors]}
        atomic_write_text(self.dir / "manifest.json", json.dumps(data))
        self._manifest = manifest

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None and self.load_manifest() is None:
            raise ManifestError("no manifest has been received for this upload")
        assert self._manifest is not None
        return self._manifest

    def _path(self, meta: TensorMeta, suffix: str) -> Path:
        return self.dir / f"{self.manifest.position(meta.name):05d}.{suffix}"

    def _complete(self, meta: TensorMeta) -> bool:
        """Whether ``meta``'s ``.bin`` is there and holds its verified bytes (one staged before a restart is hashed
        again first, and dropped when it does not match)."""
        path = self._path(meta, "bin")
        if not path.exists():
            return False
        if self._verified.has(path):
            return True
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                digest.update(block)
        if digest.digest() != meta.sha256:
            path.unlink()
            return False
        self._verified.add(path)
        return True

    def resume_point(self) -> ResumePoint:
        """Where the sender continues; START when nothing is staged, END when every tensor is complete."""
        if self.load_manifest() is None:
            return START
        for meta in self.manifest.tensors:
            if not self._complete(meta):
                part = self._path(meta, "part")
                size = part.stat().st_size if part.exists() else 0
                return ResumePoint(meta.name, min(size, meta.nbytes))
        return END

    def complete_tensors(self) -> list[str]:
        if self.load_manifest() is None:
            return []
        return [m.name for m in self.manifest.tensors if self._complete(m)]

    def bytes_held(self) -> int:
        point = self.resume_point()
        return 0 if self._manifest is None else self.manifest.bytes_before(point)

    # -- TensorSink ---------------------------------------------------------------------------------------------------

    def _file(self, meta: TensorMeta, offset: int) -> Any:
        if self._handle is not None and self._handle[0] == meta.name:
            f = self._handle[1]
        else:
            self.flush()
            path = self._path(meta, "part")
            # Unbuffered: every ~1 MiB chunk is one write(2), so QueryUpload and a restart see it at once.
            f = open(path, "r+b" if path.exists() else "w+b", buffering=0)  # noqa: SIM115 - kept open across chunks
            self._handle = (meta.name, f)
        if f.tell() != offset:
            f.seek(offset)
            f.truncate()
        return f

    def write(self, meta: TensorMeta, offset: int, data: bytes) -> None:
        self._file(meta, offset).write(data)

    def complete(self, meta: TensorMeta) -> None:
        if meta.nbytes == 0:
            self._path(meta, "part").touch()
        f = self._file(meta, meta.nbytes)
        if self._syncer is None:
            os.fsync(f.fileno())
        f.close()
        self._handle = None
        path = self._path(meta, "bin")
        os.replace(self._path(meta, "part"), path)
        self._verified.add(path)
        if self._syncer is not None:
            self._pending[path] = self._syncer.submit(_fsync_file, path)

    def discard(self, meta: TensorMeta) -> None:
        self.flush()
        self._path(meta, "part").unlink(missing_ok=True)

    def received(self, meta: TensorMeta) -> Iterator[bytes]:
        self.flush()
        path = self._path(meta, "part")
        if not path.exists():
            return
        with open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                yield block

    def flush(self) -> None:
        """Hand buffered bytes to the OS (they survive a process kill; fsync happens per complete tensor)."""
        if self._handle is not None:
            self._handle[1].flush()
            self._handle[1].close()
            self._handle = None

    # -- committed updates ----------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Make the staged files and their directory entries durable: wait for the fsyncs of the ``.bin`` files
        (started as each completed) and fsync the directories."""
        self.flush()
        pending, self._pending = self._pending, {}
        if self._syncer is not None:
            for meta in self.manifest.tensors:
                path = self._path(meta, "bin")
                future = pending.get(path)
                if future is not None:
                    future.result()
                else:  # staged by an earlier stream or process: its fsync may never have happened
                    _fsync_file(path)
        fsync_dir(self.dir)
        fsync_dir(self.dir.parent)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The staged tensors, memory-mapped read-only from their ``.bin`` files (wire dtype, manifest shapes)."""
        out: dict[str, torch.Tensor] = {}
        for meta in self.manifest.tensors:
            dtype = WIRE_DTYPES[meta.dtype]
            numel = 1
            for d in meta.shape:
                numel *= d
            if numel == 0:
                out[meta.name] = torch.empty(meta.shape, dtype=dtype)
                continue
            t = torch.from_file(str(self._path(meta, "bin")), shared=False, size=numel, dtype=dtype)
            out[meta.name] = t.reshape(meta.shape)
        return out

    def reset(self) -> None:
        self.flush()
        self._pending.clear()  # an fsync still running finds its file gone, and that is fine
        self._verified.forget(self.dir)
        for p in self.dir.iterdir():
            p.unlink()
        self._manifest = None

    def remove(self) -> None:
        self.flush()
        self._pending.clear()
        self._verified.forget(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # the upload was reset or removed meanwhile
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Verified:
    """The ``.bin`` files this process received and verified (or hashed again after a restart), by upload
    directory; thread-safe."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, set[str]] = {}
        self._lock = threading.Lock()

    def has(self, path: Path) -> bool:
        with self._lock:
            return path.name in self._by_dir.get(path.parent, ())

    def add(self, path: Path) -> None:
        with self._lock:
            self._by_dir.setdefault(path.parent, set()).add(path.name)

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

