"""The S3-compatible checkpoint store against a real S3 server process (moto's server mode on loopback).

Versions round-trip; writes are content-addressed and write-once (the same content is a no-op, a different content
an error, two writers racing for one version agree); a blob appears only once its upload completed, so a failed
upload leaves no version and no blob; readers stream the whole state or only prefixes; two store objects (two hosts)
see the same versions; the URL chooses the store."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlparse

import pytest
import torch

from raffm.checkpoints import VersionNotFoundError, checkpoint_store_from_url
from raffm.objectstore import MiB, ObjectStoreError, S3CheckpointStore


def _state(seed: int = 0, big: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"emb": torch.randn(64, 32, generator=g), "w": torch.randn(32, 32, generator=g),
             "b": torch.randn(32, generator=g).to(torch.float16), "ids": torch.arange(5)}
    if big:  # 12 MiB: three multipart parts of 5 MiB
        state["big"] = torch.randn(3 << 20, generator=g)
    return state


def _store(url: str, **kwargs: Any) -> S3CheckpointStore:
    store = checkpoint_store_from_url(url)
    assert isinstance(store, S3CheckpointStore)
    if kwargs:
        store = S3CheckpointStore(store.bucket, store.prefix, endpoint_url=store.endpoint_url, **kwargs)
    return store


def _objects(store: S3CheckpointStore) -> list[str]:
    reply = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(o["Key"] for o in reply.get("Contents", ()))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_versions_round_trip_and_are_write_once(s3_url: str) -> None:
    store = _store(s3_url)
    state = _state()
    info = store.put("job-v0", state, {"model_type": "bert"}, meta={"round": 0})
    assert len(info.digest) == 64 and info.nbytes > 0
    assert store.put("job-v0", state, {"model_type": "bert"}) == info  # same content: a no-op
    with pytest.raises(ValueError, match="different content"):
        store.put("job-v0", _state(seed=1), {"model_type": "bert"})
    assert _same(store.load("job-v0"), state)
    assert store.info("job-v0").config == {"model_type": "bert"} and store.has("job-v0")
    with pytest.raises(VersionNotFoundError):
        store.info("job-v9")
    keys = _objects(store)
    prefix = urlparse(s3_url).path.strip("/")
    assert keys == [f"{prefix}/blobs/{info.digest}.safetensors", f"{prefix}/versions/job-v0.json"]


def test_another_host_sees_the_versions_and_reads_prefixes(s3_url: str) -> None:
    writer, reader_host = _store(s3_url), _store(s3_url)
    assert reader_host.versions() == []
    states = [_state(seed=i) for i in range(3)]
    for i, s in enumerate(states):
        writer.put(f"job-v{i}", s, {"i": i}, parent=f"job-v{i - 1}" if i else None)
    assert [v.version for v in reader_host.versions()] == ["job-v0", "job-v1", "job-v2"]
    assert reader_host.info("job-v2").parent == "job-v1"
    reader = reader_host.reader("job-v1")
    assert reader.entries["emb"].shape == (64, 32)
    got = reader.read({"emb": 3 * 32, "b": None, "ids": 2})
    assert torch.equal(got["emb"], states[1]["emb"][:3].reshape(-1))
    assert torch.equal(got["b"], states[1]["b"]) and got["ids"].tolist() == [0, 1]


def test_large_blobs_go_up_in_parts_and_a_failed_upload_leaves_nothing(s3_url: str) -> None:
    store = _store(s3_url, part_bytes=5 * MiB)
    state = _state(big=True)
    info = store.put("job-v0", state, {})
    assert info.nbytes > 10 * MiB
    assert _same(_store(s3_url).load("job-v0"), state)

    class Flaky:  # the connection dies while the second part is sent
        def __init__(self, inner: Any) -> None:
            self.inner, self.parts = inner, 0

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def upload_part(self, **kwargs: Any) -> Any:
            self.parts += 1
            if self.parts == 2:
                raise ConnectionError("connection reset by peer")
            return self.inner.upload_part(**kwargs)

    flaky = S3CheckpointStore(store.bucket, store.prefix, endpoint_url=store.endpoint_url, part_bytes=5 * MiB,
                              client=Flaky(store.client))
    before = _objects(store)
    with pytest.raises(ObjectStoreError, match="connection reset"):
        flaky.put("job-v1", _state(seed=7, big=True), {})
    assert _objects(store) == before and not store.has("job-v1")  # no half-written blob, no version
    pending = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert pending == []  # the failed upload was aborted


def test_two_writers_racing_for_one_version_agree(s3_url: str) -> None:
    state = _state()
    results: list[Any] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            results.append(_store(s3_url).put("job-v0", state, {"x": 1}))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.digest for r in results}) == 1
    assert len({r.created_at for r in results}) == 1  # every writer returns the one record that won
    assert _same(_store(s3_url).load("job-v0"), state)


def test_the_url_chooses_the_store_and_a_missing_bucket_is_named(s3_server: Any) -> None:
    with pytest.raises(ObjectStoreError, match="does not exist"):
        checkpoint_store_from_url(f"s3://no-such-bucket-raffm/x?endpoint={s3_server.endpoint}")
    bucket = s3_server.create_bucket()
    store = checkpoint_store_from_url(f"s3://{bucket}", endpoint=s3_server.endpoint)
    assert isinstance(store, S3CheckpointStore) and store.prefix == "" and store.bucket == bucket
    store.put("v", _state(), {})
    assert [o.split("/")[0] for o in _objects(store)] == ["blobs", "versions"]
    with pytest.raises(ValueError, match="needs a bucket"):
        checkpoint_store_from_url("s3:///prefix-only")
