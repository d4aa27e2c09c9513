"""Model versions in an S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...): ``s3://bucket/prefix``.

Layout under the prefix, both write-once:

- ``blobs/<sha256 of the file>.safetensors``: a version's tensors. Content-addressed: the digest is computed first
  (one pass over the tensors, no IO), an existing blob is never uploaded again, and a new one is sent as one PUT or a
  multipart upload that only becomes visible when it completes, so a half-written blob is never visible.
- ``versions/<version>.json``: the version's record (digest, HF config, parent, meta). Written after its blob, with
  ``If-None-Match: *`` (create only if absent), so a version appears atomically and never changes; re-putting the
  same content is a no-op, a different content is an error.

Reads stream: :meth:`S3CheckpointStore.load` reads the object once, straight into the tensors' buffers, checking its
sha256 on the way; :meth:`S3CheckpointStore.reader` fetches only the byte ranges asked for (the leading prefixes a
slice needs), coalescing nearby ranges and fetching in parallel. Credentials and region come from the usual AWS
sources (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, a profile, an instance role); the endpoint
from the ``endpoint`` argument, or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, which botocore reads itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any
from urllib.parse import quote

import torch

from raffm.checkpoints import CheckpointReader, VersionInfo, VersionNotFoundError
from raffm.stformat import FormatError, SafetensorsReader, parse_header, serialize

MiB = 1 << 20
# Environment variables the S3 client reads (boto3's own names); the deployment manifests may set these.
S3_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CA_BUNDLE")
HEAD_PREFETCH_BYTES = 256 << 10  # one GET covers the length prefix and the header of most checkpoints


class ObjectStoreError(RuntimeError):
    """The object store refused or failed a request; the message names the bucket, key and endpoint."""


def s3_client(endpoint_url: str = "", region: str = "", *, pool: int = 32) -> Any:
    """A thread-safe boto3 S3 client: path-style addressing for custom endpoints, standard retries."""
    import boto3
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(max_pool_connections=pool, retries={"mode": "standard", "max_attempts": 5},
                    s3={"addressing_style": "path"} if endpoint_url else {}, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


class S3CheckpointStore:
    """A :class:`raffm.checkpoints.CheckpointStore` in a bucket; many writers and readers on any hosts."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str = "", region: str = "",
                 client: Any = None, part_bytes: int = 32 * MiB, workers: int = 8, check: bool = True) -> None:
        if not bucket:
            raise ValueError("an s3:// checkpoint store URL needs a bucket: s3://BUCKET/prefix")
        if part_bytes < 5 * MiB:
            raise ValueError(f"part_bytes is {part_bytes}; S3 multipart parts are at least 5 MiB")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.part_bytes, self.workers = part_bytes, workers
        self.client = client if client is not None else s3_client(endpoint_url, region, pool=max(16, 2 * workers))
        self._records: dict[str, VersionInfo] = {}  # write-once, so cached forever
        self._lock = threading.Lock()
        self._conditional = True  # If-None-Match: * supported; cleared if the server says NotImplemented
        if check:
            self._check_bucket()

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3CheckpointStore(s3://{self.bucket}/{self.prefix}{where})"

    # -- keys and requests --------------------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def blob_key(self, digest: str) -> str:
        return self._key("blobs", f"{digest}.safetensors")

    def record_key(self, version: str) -> str:
        return self._key("versions", f"{quote(version, safe='')}.json")

    def _fail(self, what: str, key: str, exc: BaseException) -> ObjectStoreError:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return ObjectStoreError(f"object store{where}: {what} s3://{self.bucket}/{key} failed: {exc}")

    def _check_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - botocore raises several types; all mean the same to the operator
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                where = f" at {self.endpoint_url}" if self.endpoint_url else ""
                raise ObjectStoreError(f"object store bucket {self.bucket!r}{where} does not exist; create it "
                                       "first") from None
            raise self._fail("checking bucket", "", exc) from None

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("HEAD", key, exc) from None

    def _create(self, key: str, body: bytes, content_type: str) -> bool:
        """PUT ``key`` only if absent; False when it already existed (412)."""
        while True:
            extra = {"IfNoneMatch": "*"} if self._conditional else {}
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type, **extra)
                return True
            except Exception as exc:  # noqa: BLE001
                code = _code(exc)
                if code in ("412", "PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if self._conditional and code in ("NotImplemented", "501"):
                    self._conditional = False  # an older server: write-once is then by HEAD-then-PUT
                    if self._exists(key):
                        return False
                    continue
                raise self._fail("PUT", key, exc) from None

    # -- writing ------------------------------------------------------------------------------------------------------

    def put(
        self, version: str, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], *,
        parent: str | None = None, meta: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        layout = serialize(state, {"raffm_version": version})
        digest = layout.sha256()  # first pass, no IO: the blob's name
        existing = self._record(version)
        if existing is not None:
            if existing.digest != digest:
                raise ValueError(f"model version {version!r} already exists with different content")
            return existing
        key = self.blob_key(digest)
        if not self._exists(key):
            self._upload(key, layout)
        info = VersionInfo(version=version, digest=digest, config=dict(config), created_at=time.time(),
                           parent=parent, meta=dict(meta or {}), nbytes=layout.nbytes)
        record = json.dumps(asdict(info), separators=(",", ":")).encode("utf-8")
        if not self._create(self.record_key(version), record, "application/json"):
            winner = self._record(version, refresh=True)
            if winner is None or winner.digest != digest:
                raise ValueError(f"model version {version!r} already exists with different content")
            return winner
        with self._lock:
            self._records[version] = info
        return info

    def _upload(self, key: str, layout: Any) -> None:
        """The blob, streamed: one PUT when small, else a multipart upload of ``part_bytes`` parts (visible only once
        completed; aborted on failure)."""
        if layout.nbytes <= self.part_bytes:
            body = bytearray()
            for piece in layout.pieces():
                body += piece
            self._create(key, bytes(body), "application/octet-stream")
            return
        try:
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                            ContentType="application/octet-stream")["UploadId"]
        except Exception as exc:  # noqa: BLE001
            raise self._fail("starting a multipart upload of", key, exc) from None
        parts: list[dict[str, Any]] = []
        try:
            buf = bytearray()
            for piece in layout.pieces():
                view = piece.cast("B") if piece.format != "B" else piece
                while len(view):
                    take = min(len(view), self.part_bytes - len(buf))
                    buf += view[:take]
                    view = view[take:]
                    if len(buf) == self.part_bytes:
                        parts.append(self._part(key, upload_id, len(parts) + 1, bytes(buf)))
                        buf.clear()
            if buf:
                parts.append(self._part(key, upload_id, len(parts) + 1, bytes(buf)))
            extra = {"IfNoneMatch": "*"} if self._conditional else {}
            try:
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                      MultipartUpload={"Parts": parts}, **extra)
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in ("412", "PreconditionFailed", "ConditionalRequestConflict"):
                    raise
                # Another writer completed the same content-addressed blob first: ours is not needed.
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except BaseException as exc:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001, S110 - the upload is invisible either way; the bucket's lifecycle rule cleans up
                pass
            if isinstance(exc, Exception) and not isinstance(exc, ObjectStoreError):
                raise self._fail("multipart upload of", key, exc) from None
            raise

    def _part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        reply = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data)
        return {"ETag": reply["ETag"], "PartNumber": number}

    # -- reading ------------------------------------------------------------------------------------------------------

    def _record(self, version: str, *, refresh: bool = False) -> VersionInfo | None:
        with self._lock:
            if not refresh and version in self._records:
                return self._records[version]
        key = self.record_key(version)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("GET", key, exc) from None
        info = VersionInfo(**json.loads(body))
        with self._lock:
            self._records[version] = info
        return info

    def info(self, version: str) -> VersionInfo:
        info = self._record(version)
        if info is None:
            raise VersionNotFoundError(f"model version {version!r} is not in the checkpoint store {self!r}")
        return info

    def has(self, version: str) -> bool:
        return self._record(version) is not None

    def versions(self) -> list[VersionInfo]:
        prefix = self._key("versions") + "/"
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", ()) if o["Key"].endswith(".json")]
        except Exception as exc:  # noqa: BLE001
            raise self._fail("LIST", prefix, exc) from None
        from urllib.parse import unquote

        names = [unquote(k[len(prefix):-len(".json")]) for k in keys]
        with ThreadPoolExecutor(self.workers, thread_name_prefix="s3-records") as pool:
            infos = [i for i in pool.map(self._record, names) if i is not None]
        return sorted(infos, key=lambda v: v.created_at)

    def load(self, version: str) -> dict[str, torch.Tensor]:
        """The whole state, from one streamed GET straight into the tensors; the blob's sha256 is checked."""
        info = self.info(version)
        key = self.blob_key(info.digest)
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except Exception as exc:  # noqa: BLE001
            raise self._fail("GET", key, exc) from None
        digest = hashlib.sha256()

        def read_exactly(out: memoryview) -> None:
            done = 0
            while done < len(out):
                n = body.readinto(out[done:])
                if not n:
                    raise FormatError(f"s3://{self.bucket}/{key} ended early")
                done += n
            digest.update(out)

        with body:
            size = bytearray(8)
            read_exactly(memoryview(size))
            head = bytearray(int.from_bytes(size, "little"))
            read_exactly(memoryview(head))
            entries, _ = parse_header(bytes(head), 8 + len(head))
            state: dict[str, torch.Tensor] = {}
            position = 8 + len(head)
            for entry in sorted(entries.values(), key=lambda e: e.start):
                if entry.start != position:  # padding or a gap: read past it
                    read_exactly(memoryview(bytearray(entry.start - position)))
                t = torch.empty(entry.shape, dtype=entry.dtype)
                if t.numel():
                    read_exactly(t.view(-1).view(torch.uint8).numpy().data)
                state[entry.name] = t
                position = entry.end
            while chunk := body.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != info.digest:
            raise FormatError(f"s3://{self.bucket}/{key}: sha256 {digest.hexdigest()} does not match its name")
        return {n: state[n] for n in entries}

    def reader(self, version: str) -> CheckpointReader:
        key = self.blob_key(self.info(version).digest)
        head: list[bytes] = []

        def read_range(start: int, out: memoryview) -> None:
            if not len(out):
                return
            if start == 0 and not head:  # prefetch: the length prefix and (usually) the whole header
                head.append(self._get_range(key, 0, HEAD_PREFETCH_BYTES, allow_short=True))
            if head and start + len(out) <= len(head[0]):
                out[:] = head[0][start:start + len(out)]
                return
            data = self._get_range(key, start, len(out))
            out[:] = data

        return SafetensorsReader(read_range, gap_bytes=1 * MiB, max_read_bytes=64 * MiB, workers=self.workers)

    def _get_range(self, key: str, start: int, length: int, *, allow_short: bool = False) -> bytes:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
            data: bytes = reply["Body"].read()
        except Exception as exc:  # noqa: BLE001
            raise self._fail(f"GET bytes {start}+{length} of", key, exc) from None
        if len(data) != length and not allow_short:
            raise FormatError(f"s3://{self.bucket}/{key}: asked for {length} bytes at {start}, got {len(data)}")
        return data
