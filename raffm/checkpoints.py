"""Model-version checkpoint stores: content-addressed safetensors blobs in a directory, in an S3-compatible object
store (:mod:`raffm.objectstore`), or in memory for tests; chosen by URL (:func:`checkpoint_store_from_url`).

A *version* (e.g. ``job-v3``) names one global model state plus the HF config it belongs to. The file store keeps
``blobs/<sha256 of the file>.safetensors`` and an ``index.json`` mapping versions to blobs; both are written with
write-to-temp, fsync, rename, so a crash leaves either the old or the new index, never a torn one. The aggregator
writes versions; the extractor (maybe another process, on another host with the object store) reads them.

Safetensors files are written tensor by tensor (:mod:`raffm.stformat`), so a multi-GB state is never serialised into
one in-memory buffer, and read through :meth:`CheckpointStore.reader`, which fetches only the tensors, or the leading
prefixes of tensors, that a caller asks for (a sub-model's slice needs no more).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlparse

import torch

from raffm.stformat import SafetensorsReader, TensorEntry, serialize


class VersionNotFoundError(LookupError):
    """The named model version is not in the store."""


@dataclass(frozen=True)
class VersionInfo:
    version: str
    digest: str  # sha256 (hex) of the safetensors blob; "" in the memory store
    config: dict[str, Any]
    created_at: float
    parent: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


class CheckpointReader(Protocol):
    """One stored version's tensors, read on demand."""

    @property
    def entries(self) -> Mapping[str, TensorEntry]:
        """Every tensor's name, dtype and shape (and where its bytes are)."""

    def read(self, wanted: Mapping[str, int | None]) -> dict[str, torch.Tensor]:
        """``name -> n``: the first ``n`` elements (row-major) of each tensor, ``None`` for all, as 1-D tensors."""


class CheckpointStore(Protocol):
    def put(
        self, version: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
        parent: str | None = None, meta: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        """Store ``state`` as ``version`` (idempotent for the same content; a different content is an error)."""

    def info(self, version: str) -> VersionInfo: ...

    def load(self, version: str) -> dict[str, torch.Tensor]: ...

    def reader(self, version: str) -> CheckpointReader:
        """Read parts of a version without loading the rest (see :class:`CheckpointReader`)."""

    def versions(self) -> list[VersionInfo]:
        """Every version, oldest first."""

    def has(self, version: str) -> bool: ...


def write_safetensors(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """Write a safetensors file tensor by tensor, fsync it, and return the sha256 (hex) of its bytes."""
    layout = serialize(state, metadata)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in layout.pieces():
            f.write(piece)
            digest.update(piece)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def file_range_reader(path: Path) -> Any:
    """A :data:`raffm.stformat.RangeReader` over a local file."""

    def read(start: int, out: memoryview) -> None:
        with open(path, "rb", buffering=0) as f:
            f.seek(start)
            view, done = out, 0
            while done < len(out):
                n = f.readinto(view[done:])
                if not n:
                    raise EOFError(f"{path} ends before byte {start + len(out)}")
                done += n

    return read


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return SafetensorsReader(file_range_reader(path)).tensors()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (fsync the directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a crash leaves the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class FileCheckpointStore:
    """``root/blobs/<sha256>.safetensors`` plus ``root/index.json``; safe for one writer and many reader processes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.json"
        self._lock = threading.Lock()
        self._cache: tuple[float, int, dict[str, VersionInfo]] | None = None

    def _index(self) -> dict[str, VersionInfo]:
        try:
            st = self.index_path.stat()
        except FileNotFoundError:
            return {}
        if self._cache is not None and self._cache[:2] == (st.st_mtime, st.st_size):
            return self._cache[2]
        data = json.loads(self.index_path.read_text(encoding="utf-8"))
        index = {v["version"]: VersionInfo(**v) for v in data["versions"]}
        self._cache = (st.st_mtime, st.st_size, index)
        return index

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"{digest}.safetensors"

    def put(
        self, version: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
        parent: str | None = None, meta: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        with self._lock:
            fd, tmp_name = tempfile.mkstemp(dir=self.blobs, prefix=".incoming-", suffix=".safetensors")
            os.close(fd)
            tmp = Path(tmp_name)
            try:
                digest = write_safetensors(tmp, state, {"raffm_version": version})
                # The version name is in the metadata, so equal states under two names are two blobs; a re-put of the
                # same version after a crash is the same blob.
                target = self.blob_path(digest)
                nbytes = tmp.stat().st_size
                os.replace(tmp, target)
                fsync_dir(self.blobs)
            finally:
                tmp.unlink(missing_ok=True)
            index = dict(self._index())
            existing = index.get(version)
            if existing is not None:
                if existing.digest != digest:
                    raise ValueError(f"model version {version!r} already exists with different content")
                return existing
            info = VersionInfo(version=version, digest=digest, config=dict(config), created_at=time.time(),
                               parent=parent, meta=dict(meta or {}), nbytes=nbytes)
            index[version] = info
            ordered = sorted(index.values(), key=lambda v: v.created_at)
            atomic_write_text(self.index_path, json.dumps({"versions": [asdict(v) for v in ordered]}, indent=1))
            self._cache = None
            return info

    def info(self, version: str) -> VersionInfo:
        try:
            return self._index()[version]
        except KeyError:
            raise VersionNotFoundError(f"model version {version!r} is not in the checkpoint store {self.root}") from None

    def has(self, version: str) -> bool:
        return version in self._index()

    def load(self, version: str) -> dict[str, torch.Tensor]:
        info = self.info(version)
        return read_safetensors(self.blob_path(info.digest))

    def reader(self, version: str) -> CheckpointReader:
        return SafetensorsReader(file_range_reader(self.blob_path(self.info(version).digest)))

    def versions(self) -> list[VersionInfo]:
        return sorted(self._index().values(), key=lambda v: v.created_at)


class MemoryCheckpointStore:
    """Versions in a dict (copies in, copies out); for tests and single-process runs."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[VersionInfo, dict[str, torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def put(
        self, version: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
        parent: str | None = None, meta: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        with self._lock:
            if version in self._items:
                return self._items[version][0]
            info = VersionInfo(version=version, digest="", config=dict(config), created_at=time.time(),
                               parent=parent, meta=dict(meta or {}),
                               nbytes=sum(t.numel() * t.element_size() for t in state.values()))
            self._items[version] = (info, {k: v.detach().clone() for k, v in state.items()})
            return info

    def info(self, version: str) -> VersionInfo:
        try:
            return self._items[version][0]
        except KeyError:
            raise VersionNotFoundError(f"model version {version!r} is not in the memory checkpoint store") from None

    def has(self, version: str) -> bool:
        return version in self._items

    def load(self, version: str) -> dict[str, torch.Tensor]:
        self.info(version)
        return {k: v.clone() for k, v in self._items[version][1].items()}

    def reader(self, version: str) -> CheckpointReader:
        self.info(version)
        return _StateReader(self._items[version][1])

    def versions(self) -> list[VersionInfo]:
        return sorted((i for i, _ in self._items.values()), key=lambda v: v.created_at)


class _StateReader:
    """A :class:`CheckpointReader` over tensors in memory."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self._state = state
        self.entries = {n: TensorEntry(n, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
                        for n, t in state.items()}

    def read(self, wanted: Mapping[str, int | None]) -> dict[str, torch.Tensor]:
        out = {}
        for name, n in wanted.items():
            flat = self._state[name].reshape(-1)
            out[name] = (flat if n is None else flat[:n]).clone()
        return out


def checkpoint_store_from_url(url: str, *, endpoint: str = "") -> CheckpointStore:
    """``file:///abs/dir`` (a bare path means a directory too), ``s3://bucket/prefix`` (an S3-compatible object
    store; ``endpoint``, or ``?endpoint=URL`` in the URL, names a MinIO / Ceph / other server instead of AWS), or
    ``memory://``."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        from raffm.objectstore import S3CheckpointStore

        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        return S3CheckpointStore(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint or query.get("endpoint", ""),
                                 region=query.get("region", ""))
    if parsed.scheme == "memory":
        return MemoryCheckpointStore()
    if parsed.scheme == "file":
        return FileCheckpointStore(Path(parsed.netloc + parsed.path) if parsed.netloc else Path(parsed.path))
    if parsed.scheme == "":
        return FileCheckpointStore(Path(url))
    raise ValueError(f"checkpoint store URL {url!r} is not supported; use file:///path/to/dir, s3://bucket/prefix "
                     "or memory://")

