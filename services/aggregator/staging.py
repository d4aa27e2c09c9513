"""Durable staging of uploads: one directory per ticket, one file per tensor, resumable across restarts.

Layout: ``<root>/<round_id>/<ticket_id>/manifest.json`` and ``NNNNN.part`` (being received) / ``NNNNN.bin``
(complete, sha256 verified, fsynced). The resume point of an interrupted upload is the first tensor without a
``.bin`` and the size of its ``.part``. A committed update is read back as tensors memory-mapped from the ``.bin``
files, so validating and folding a multi-GB update does not copy it into anonymous memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from raffm.checkpoints import atomic_write_text, fsync_dir
from raffm.wire import END, START, WIRE_DTYPES, Manifest, ManifestError, ResumePoint, TensorMeta

_READ_BLOCK = 4 << 20


class StagedUpload:
    """The staging directory of one ticket's upload; also the :class:`raffm.reassembly.TensorSink` it is received
    into."""

    def __init__(self, root: Path, round_id: str, ticket_id: str) -> None:
        self.dir = root / round_id / ticket_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self._manifest: Manifest | None = None
        self._handle: tuple[str, Any] | None = None

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

    def resume_point(self) -> ResumePoint:
        """Where the sender continues; START when nothing is staged, END when every tensor is complete."""
        if self.load_manifest() is None:
            return START
        for meta in self.manifest.tensors:
            if not self._path(meta, "bin").exists():
                part = self._path(meta, "part")
                size = part.stat().st_size if part.exists() else 0
                return ResumePoint(meta.name, min(size, meta.nbytes))
        return END

    def complete_tensors(self) -> list[str]:
        if self.load_manifest() is None:
            return []
        return [m.name for m in self.manifest.tensors if self._path(m, "bin").exists()]

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
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._handle = None
        os.replace(self._path(meta, "part"), self._path(meta, "bin"))

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
        """Make the directory entries durable (the files were fsynced as they completed)."""
        self.flush()
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
        for p in self.dir.iterdir():
            p.unlink()
        self._manifest = None

    def remove(self) -> None:
        self.flush()
        shutil.rmtree(self.dir, ignore_errors=True)


class Staging:
    """All staged uploads under one directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def upload(self, round_id: str, ticket_id: str) -> StagedUpload:
        return StagedUpload(self.root, round_id, ticket_id)

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
                shutil.rmtree(d, ignore_errors=True)

