"""Client side of the streamed transfers (sync gRPC): download a slice, upload an update, both resumable.

The scripted client of the integration tests and benchmarks; depends only on the generated stubs and
:mod:`raffm.wire`. The edge agent has its own transfer loop (``edge_agent/transfer.py``: progress bars, fault
injection, re-fetch of corrupted tensors); folding the two into one is open work.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from raffm.v1 import aggregator_pb2, common_pb2, extractor_pb2
from raffm.proto import manifest_from_proto, manifest_to_proto, resume_from_proto, resume_to_proto
from raffm.reassembly import Reassembler, TensorSink
from raffm.wire import DEFAULT_CHUNK_BYTES, START, Manifest, ResumePoint, WirePayload, iter_chunks


@dataclass
class Download:
    manifest: Manifest
    manifest_proto: Any
    reassembler: Reassembler


def download_slice(
    stub: Any, ticket: bytes, sink: TensorSink, *, metadata: Any = (), resume: ResumePoint = START,
    chunk_bytes: int = 0, timeout: float | None = 600.0, max_chunks: int | None = None,
) -> Download:
    """Stream a slice into ``sink`` from ``resume``; verifies every tensor. ``max_chunks`` simulates a broken link
    (the call is cancelled after that many chunks; the returned reassembler knows where to resume)."""
    request = extractor_pb2.DownloadRequest(ticket=ticket, chunk_bytes=chunk_bytes,
                                            resume_from=resume_to_proto(resume) if not resume.at_start else None)
    call = stub.DownloadSlice(request, metadata=metadata, timeout=timeout)
    first = next(call)
    if first.WhichOneof("body") != "manifest":
        raise ValueError("the extractor did not start with a manifest")
    manifest = manifest_from_proto(first.manifest)
    r = Reassembler(manifest, sink, resume)
    n = 0
    for msg in call:
        r.accept(msg.chunk.tensor, msg.chunk.offset, msg.chunk.data)
        n += 1
        if max_chunks is not None and n >= max_chunks:
            call.cancel()
            break
    return Download(manifest, first.manifest, r)


def upload_messages(
    ticket: bytes, sample_count: int, payload: WirePayload, *, metrics: Mapping[str, float] | None = None,
    resume: ResumePoint = START, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_chunks: int | None = None,
) -> Iterator[aggregator_pb2.UploadMessage]:
    """Header, manifest, then chunks from ``resume`` (stopping after ``max_chunks`` to simulate a break)."""
    m = dict(metrics or {})
    yield aggregator_pb2.UploadMessage(header=aggregator_pb2.UpdateHeader(
        ticket=ticket, sample_count=sample_count,
        metrics=aggregator_pb2.TrainMetrics(loss=m.get("loss", 0.0), steps=int(m.get("steps", 0)),
                                            seconds=m.get("seconds", 0.0), peak_memory_mb=m.get("peak_memory_mb", 0.0),
                                            accuracy=m.get("accuracy", 0.0))))
    yield aggregator_pb2.UploadMessage(manifest=manifest_to_proto(payload.manifest))
    for i, c in enumerate(iter_chunks(payload.manifest, payload.source, resume, chunk_bytes)):
        if max_chunks is not None and i >= max_chunks:
            raise ConnectionAbortedError("simulated broken upload")
        yield aggregator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(tensor=c.tensor, offset=c.offset, data=c.data))


def upload_update(
    stub: Any, ticket: bytes, sample_count: int, payload: WirePayload, *, metadata: Any = (),
    timeout: float | None = 600.0, resume: bool = False, **kwargs: Any,
) -> aggregator_pb2.UploadAck:
    """Upload ``payload``; with ``resume=True`` ask QueryUpload first and send only what is missing."""
    start = START
    if resume:
        state = stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=ticket), metadata=metadata, timeout=30)
        if state.committed:
            return aggregator_pb2.UploadAck(accepted=True, bytes_received=state.bytes_received)
        start = resume_from_proto(state.resume_from)
    return stub.UploadUpdate(upload_messages(ticket, sample_count, payload, resume=start, **kwargs),
                             metadata=metadata, timeout=timeout)


def tensors_of(sink: Any) -> dict[str, torch.Tensor]:
    return dict(sink.tensors)
