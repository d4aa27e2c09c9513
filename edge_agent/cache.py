"""The device's tensor cache: wire bytes of tensors it received before, on disk, keyed by their sha256.

A recipe's frozen tensors (the vocabulary embeddings, half of MiniLM) do not change from round to round, so a device
keeps them and tells the extractor which it holds (``DownloadRequest.have_sha256``); the extractor then streams
every tensor but those. The cache lives in the agent's state directory, so it survives restarts and costs no memory
between rounds; a cached tensor is checked against the manifest's sha256 like any downloaded one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO


class TensorCache:
    """Files ``<dir>/<sha256 hex>``, each the wire bytes of one tensor; written atomically."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def digests(self) -> list[bytes]:
        """The sha256 of every cached tensor."""
        found = []
        for path in self.dir.iterdir():
            try:
                digest = bytes.fromhex(path.name)
            except ValueError:
                continue  # a temporary file, or something that is not ours
            if len(digest) == 32:
                found.append(digest)
        return sorted(found)

    def open(self, sha256: bytes) -> BinaryIO | None:
        """The cached wire bytes of the tensor with this sha256 as an open file (read it in pieces: a whole vocabulary
        read at once would sit in memory beside its copy in the model), or None."""
        try:
            return (self.dir / sha256.hex()).open("rb")
        except FileNotFoundError:
            return None

    def put(self, sha256: bytes, data: bytes | memoryview) -> None:
        path = self.dir / sha256.hex()
        if path.exists():
            return
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def drop(self, sha256: bytes) -> None:
        (self.dir / sha256.hex()).unlink(missing_ok=True)

    def keep(self, digests: Iterable[bytes]) -> None:
        """Drop every cached tensor whose sha256 is not in ``digests``."""
        wanted = {d.hex() for d in digests}
        for path in self.dir.iterdir():
            if path.name not in wanted:
                path.unlink(missing_ok=True)
