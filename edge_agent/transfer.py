"""Moving weight slices, the client side of the transfer protocol: the one implementation that the agent, the tests
and the benchmarks use.

Download: the extractor streams a manifest (names, shapes, sha256) then chunks. A :class:`SliceReceiver` takes one
stream after another into one reassembler, so a broken stream is re-opened with ``resume_from`` = the first byte not
yet held, and a tensor whose sha256 does not match is dropped and fetched again from its first byte. Upload: header,
manifest, chunks (:func:`upload_messages`); if the stream breaks, ``QueryUpload`` says what the aggregator already
holds and the upload continues from there (or stops, when the update was already committed).

Two ways to drive it: :func:`download_slice` and :func:`upload_update` are the agent's, with retries and backoff,
stop requests, fault injection, progress and re-fetches; :func:`download_once` and :func:`upload_once` make exactly
one attempt on a plain stub, for scripted clients that break and resume transfers on purpose.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from edge_agent.cache import TensorCache
from edge_agent.client import STREAM_BROKEN, Backoff, ServiceClient, ServiceError, Stopped, details_of, status_of
from edge_agent.progress import Progress
from raffm.chunkwire import ChunkMessage
from raffm.proto import (
    manifest_from_proto, manifest_to_proto, resume_from_proto, resume_to_proto, wire_dtype_from_proto,
    wire_dtype_to_proto,
)
from raffm.reassembly import MemorySink, Reassembler, TensorSink
from raffm.v1 import aggregator_pb2, common_pb2, extractor_pb2
from raffm.wire import (
    DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, START, ChecksumError, Manifest, ResumePoint, WireError,
    WirePayload, iter_chunks,
)

log = logging.getLogger("edge_agent.transfer")

MAX_REFETCH_PER_TENSOR = 3
CACHE_PIECE_BYTES = 1 << 20  # cached tensors are read into the model in pieces this large, like network chunks


class _Cancelled(grpc.RpcError):
    """A call this side cancelled, seen as a broken stream."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "cancelled by the agent"


class TransferError(Exception):
    """A transfer could not be completed (retries exhausted, protocol violation, rejected upload)."""


@dataclass
class UploadResult:
    ack: aggregator_pb2.UploadAck
    resumes: int = 0
    resumed_at: tuple[int, ...] = ()  # bytes the aggregator already held at each resume


@dataclass
class DownloadResult:
    manifest: Manifest
    manifest_proto: common_pb2.Manifest
    tensors: dict[str, torch.Tensor]  # in the wire dtype, manifest order
    bytes_received: int  # over the network, including re-fetched and resumed bytes (not what the cache gave)
    resumes: int
    refetches: int
    cached_bytes: int = 0  # bytes of tensors taken from the device's cache instead of the network


# ----------------------------------------------------------------------------------------------------- the protocol


def download_request(ticket: bytes, *, chunk_bytes: int = 0, resume: ResumePoint = START,
                     have: Iterable[bytes] = ()) -> extractor_pb2.DownloadRequest:
    """A DownloadSlice request for ``ticket``'s slice from ``resume`` on (0 ``chunk_bytes``: the server's default),
    skipping the tensors whose sha256 is in ``have``."""
    request = extractor_pb2.DownloadRequest(ticket=ticket, chunk_bytes=chunk_bytes, have_sha256=list(have))
    if not resume.at_start:
        request.resume_from.CopyFrom(resume_to_proto(resume))
    return request


class SliceReceiver:
    """One slice, received over one or more DownloadSlice streams into ``sink``.

    The first manifest starts the reassembler, at ``resume`` when the sink already holds the part before it; the
    manifest of a resumed stream must be the same one. Chunks are verified as they complete (``ChecksumError`` for a
    corrupt tensor, which the sink then forgets, so it can be fetched again from :attr:`resume_point`).
    """

    def __init__(self, sink: TensorSink, resume: ResumePoint = START, cache: TensorCache | None = None) -> None:
        self.sink = sink
        self._start = resume
        self._cache = cache
        self._reassembler: Reassembler | None = None
        self.manifest_proto: common_pb2.Manifest | None = None
        self.cached_bytes = 0  # taken from the cache, not the network

    @property
    def started(self) -> bool:
        return self._reassembler is not None

    @property
    def reassembler(self) -> Reassembler:
        if self._reassembler is None:
            raise TransferError("the extractor closed the stream without sending a manifest")
        return self._reassembler

    @property
    def manifest(self) -> Manifest:
        return self.reassembler.manifest

    @property
    def resume_point(self) -> ResumePoint:
        return self._reassembler.resume_point if self._reassembler is not None else self._start

    def receive(self, msg: Any) -> int:
        """Take one message of a slice stream (a ``SliceMessage`` or a :class:`ChunkMessage`); returns the bytes of the
        chunk it carried (0 for a manifest)."""
        body = msg.WhichOneof("body")
        if body == "manifest":
            manifest = manifest_from_proto(msg.manifest)
            if self._reassembler is None:
                self.manifest_proto = msg.manifest
                self._reassembler = Reassembler(manifest, self.sink, self._start)
            elif manifest != self._reassembler.manifest:
                raise TransferError("the slice changed between resumed downloads; the round must restart")
            self._take_cached()
            return 0
        if body == "chunk":
            if self._reassembler is None:
                raise TransferError("the extractor sent a chunk before the manifest")
            chunk = msg.chunk
            data = chunk.data  # a protobuf message copies its bytes on every read
            if self._reassembler.accept(chunk.tensor, int(chunk.offset), data) is not None:
                self._take_cached()
            return len(data)
        raise TransferError(f"unexpected message {body!r} in the slice stream")

    def _take_cached(self) -> None:
        """Fill the next tensors from the cache while it holds them (the extractor skips what we said we have)."""
        r = self._reassembler
        if self._cache is None or r is None:
            return
        while not r.done and r.resume_point.offset == 0:
            meta = r.manifest.tensors[r.manifest.position(r.resume_point.tensor)]
            file = self._cache.open(meta.sha256) if meta.nbytes else None
            if file is None:
                return
            with file:
                offset = 0
                try:
                    while piece := file.read(CACHE_PIECE_BYTES):
                        r.accept(meta.name, offset, piece)
                        offset += len(piece)
                except ChecksumError:
                    self._cache.drop(meta.sha256)  # a damaged file: fetch the tensor from the extractor instead
                    raise
            self.cached_bytes += offset


def update_header(ticket: bytes, sample_count: int, metrics: Mapping[str, Any] | None = None
                  ) -> aggregator_pb2.UpdateHeader:
    """The first message of an upload: the ticket, the samples trained on, and the round's training metrics (figures,
    and a classifier's ``label_counts``)."""
    m = dict(metrics or {})
    return aggregator_pb2.UpdateHeader(
        ticket=ticket, sample_count=sample_count,
        metrics=aggregator_pb2.TrainMetrics(loss=m.get("loss", 0.0), steps=int(m.get("steps", 0)),
                                            seconds=m.get("seconds", 0.0), peak_memory_mb=m.get("peak_memory_mb", 0.0),
                                            accuracy=m.get("accuracy", 0.0),
                                            download_bytes=int(m.get("download_bytes", 0)),
                                            step_seconds=m.get("step_seconds", 0.0), samples=int(m.get("samples", 0)),
                                            download_seconds=m.get("download_seconds", 0.0),
                                            download_mbps=m.get("download_mbps", 0.0),
                                            upload_mbps=m.get("upload_mbps", 0.0),
                                            label_counts=[int(c) for c in m.get("label_counts", ())]))


def upload_messages(
    ticket: bytes, sample_count: int, payload: WirePayload, *, metrics: Mapping[str, Any] | None = None,
    manifest: common_pb2.Manifest | None = None, resume: ResumePoint = START, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_chunk: Callable[[int], None] | None = None, max_chunks: int | None = None,
) -> Iterator[aggregator_pb2.UploadMessage | ChunkMessage]:
    """Header, manifest (``manifest``, or the payload's bare one), then chunks from ``resume`` (as
    :class:`ChunkMessage` views of the payload: send them through a stub from
    :func:`edge_agent.client.aggregator_stub`).

    ``on_chunk(nbytes)`` runs after each chunk is handed over; ``max_chunks`` raises ``ConnectionAbortedError`` after
    that many chunks (a simulated broken link).
    """
    yield aggregator_pb2.UploadMessage(header=update_header(ticket, sample_count, metrics))
    if manifest is None:
        manifest = manifest_to_proto(payload.manifest)
    yield aggregator_pb2.UploadMessage(manifest=manifest)
    for i, c in enumerate(iter_chunks(payload.manifest, payload.source, resume, chunk_bytes)):
        if max_chunks is not None and i >= max_chunks:
            raise ConnectionAbortedError("simulated broken upload")
        yield ChunkMessage(c)
        if on_chunk is not None:
            on_chunk(len(c.data))


# ----------------------------------------------------------------------------------------------------- one attempt


def download_once(
    stub: Any, ticket: bytes, sink: TensorSink, *, metadata: Any = (), resume: ResumePoint = START,
    chunk_bytes: int = 0, timeout: float | None = 600.0, max_chunks: int | None = None,
) -> SliceReceiver:
    """Stream a slice into ``sink`` from ``resume``, verifying every tensor, in one call. ``max_chunks`` simulates a
    broken link (the call is cancelled after that many chunks; the receiver knows where to resume)."""
    call = stub.DownloadSlice(download_request(ticket, chunk_bytes=chunk_bytes, resume=resume), metadata=metadata,
                              timeout=timeout)
    receiver = SliceReceiver(sink, resume)
    chunks = 0
    for msg in call:
        if receiver.receive(msg):
            chunks += 1
            if max_chunks is not None and chunks >= max_chunks:
                call.cancel()
                break
    receiver.reassembler  # noqa: B018 - raises TransferError when the stream brought no manifest
    return receiver


def upload_once(
    stub: Any, ticket: bytes, sample_count: int, payload: WirePayload, *, metadata: Any = (),
    timeout: float | None = 600.0, resume: bool = False, **kwargs: Any,
) -> aggregator_pb2.UploadAck:
    """Upload ``payload`` in one call; with ``resume=True`` ask QueryUpload first and send only what is missing.
    ``kwargs`` go to :func:`upload_messages`."""
    start = START
    if resume:
        state = stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=ticket), metadata=metadata, timeout=30)
        if state.committed:
            return aggregator_pb2.UploadAck(accepted=True, bytes_received=state.bytes_received)
        start = resume_from_proto(state.resume_from)
    return stub.UploadUpdate(upload_messages(ticket, sample_count, payload, resume=start, **kwargs),
                             metadata=metadata, timeout=timeout)


# ----------------------------------------------------------------------------------------------------- the agent's


def download_slice(
    client: ServiceClient, assignment: aggregator_pb2.Assignment, progress: Progress,
    cache: TensorCache | None = None,
) -> DownloadResult:
    """Download and verify the slice of ``assignment``, taking the tensors ``cache`` holds from it; resumes broken
    streams and re-fetches corrupt tensors."""
    config = client.config
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    sink = MemorySink()
    receiver = SliceReceiver(sink, cache=cache)
    resumes = refetches = 0
    refetched: dict[str, int] = {}
    failures = 0
    bar = progress.bar("download", 0, "B", unit_scale=True, event="download", round=assignment.round_id)
    try:
        while True:
            client.stopper.check()
            have = cache.digests() if cache is not None else []
            call = client.extractor(assignment.extractor_target).DownloadSlice(
                download_request(assignment.ticket, chunk_bytes=config.chunk_bytes, resume=receiver.resume_point,
                                 have=have),
                timeout=config.transfer_timeout_s, metadata=client.metadata(),
            )
            handle = client.stopper.on_stop(call.cancel)
            stream: Iterator[Any] = call
            if client.faults is not None:
                stream = client.faults.wrap_download(call, call.cancel)
            corrupt: str | None = None
            try:
                for msg in stream:
                    try:
                        received = receiver.receive(msg)
                    except ChecksumError as exc:
                        corrupt = msg.chunk.tensor
                        log.warning("%s; fetching it again", exc,
                                    extra={"event": "download_refetch", "tensor": corrupt})
                        call.cancel()
                        break
                    if received:
                        bar.update(received)
                    elif not bar.total:  # the first manifest: now the size is known
                        bar.set_total(receiver.manifest.total_bytes)
            except grpc.RpcError as err:
                code = status_of(err)
                if client.stopper.stopped:
                    raise Stopped(client.stopper.reason) from None
                if code not in STREAM_BROKEN:
                    raise ServiceError("extractor.DownloadSlice", code, details_of(err)) from None
                failures += 1
                if failures > config.max_transfer_retries:
                    raise TransferError(f"download failed {failures} times; last: {code.name}: {details_of(err)}")
                resumes += 1
                at = receiver.resume_point
                delay = backoff.next_delay()
                log.warning("download broken (%s: %s) at tensor %r offset %d; resuming in %.1fs",
                            code.name, details_of(err)[:200], at.tensor, at.offset, delay,
                            extra={"event": "download_resume", "code": code.name, "tensor": at.tensor,
                                   "offset": at.offset})
                client.stopper.wait(delay)
                continue
            except WireError as exc:
                raise TransferError(f"the slice stream is malformed: {exc}") from exc
            finally:
                client.stopper.remove(handle)
            if corrupt is not None:
                refetches += 1
                refetched[corrupt] = refetched.get(corrupt, 0) + 1
                if refetched[corrupt] > MAX_REFETCH_PER_TENSOR:
                    raise TransferError(f"tensor {corrupt!r} failed its sha256 check {refetched[corrupt]} times")
                bar.reset_to(receiver.reassembler.bytes_held if receiver.started else 0)
                continue
            reassembler, manifest_proto = receiver.reassembler, receiver.manifest_proto
            assert manifest_proto is not None  # set with the reassembler
            if not reassembler.done:  # the server ended the stream early: resume like a broken link
                failures += 1
                if failures > config.max_transfer_retries:
                    raise TransferError(f"download incomplete after {failures} attempts")
                resumes += 1
                continue
            tensors = {name: sink.tensors[name] for name in reassembler.manifest.names}
            network = reassembler.bytes_received - receiver.cached_bytes
            log.info("downloaded %d tensors, %.1f MiB (%.1f MiB from the cache; %d resumes, %d re-fetched)",
                     len(tensors), network / 2**20, receiver.cached_bytes / 2**20, resumes, refetches,
                     extra={"event": "download_done", "bytes": network, "cached_bytes": receiver.cached_bytes,
                            "resumes": resumes, "refetches": refetches, "round": assignment.round_id})
            return DownloadResult(reassembler.manifest, manifest_proto, tensors, network, resumes, refetches,
                                  receiver.cached_bytes)
    finally:
        bar.close()


def upload_update(
    client: ServiceClient,
    assignment: aggregator_pb2.Assignment,
    delta: Mapping[str, torch.Tensor],
    names: list[str],
    sample_count: int,
    metrics: Mapping[str, Any],
    progress: Progress,
    on_chunk: Callable[[int], None] | None = None,
) -> UploadResult:
    """Upload ``delta`` (float tensors, named as in the download) in the assignment's wire dtype, with the samples it
    was trained on and the round's training metrics; resumes on breaks. ``on_chunk(nbytes)`` runs after each chunk
    (a simulated slow link paces itself there)."""
    config = client.config
    dtype = wire_dtype_from_proto(assignment.hparams.wire_dtype)
    payload = WirePayload.from_state(delta, dtype, names)
    chunk_bytes = config.chunk_bytes or DEFAULT_CHUNK_BYTES
    chunk_bytes = max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, chunk_bytes))
    manifest_msg = manifest_to_proto(
        payload.manifest, model_version=assignment.model_version, spec=assignment.spec, chunk_bytes=chunk_bytes,
        architecture=assignment.task.architecture, wire_dtype=wire_dtype_to_proto(dtype),
    )
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    start = START
    failures = 0
    resumed_at: list[int] = []
    bar = progress.bar("upload", payload.nbytes, "B", unit_scale=True, event="upload", round=assignment.round_id)
    try:
        while True:
            client.stopper.check()
            bar.reset_to(payload.manifest.bytes_before(start))

            done = threading.Event()
            holder: list[Any] = []

            def cancel() -> None:
                if holder:
                    holder[0].cancel()

            requests: Iterator[Any] = upload_messages(
                assignment.ticket, sample_count, payload, metrics=metrics, manifest=manifest_msg, resume=start,
                chunk_bytes=chunk_bytes, on_chunk=bar.update if on_chunk is None else _both(bar.update, on_chunk))
            if client.faults is not None:
                def held() -> int:
                    reply = client.aggregator.QueryUpload(
                        aggregator_pb2.QueryUploadRequest(ticket=assignment.ticket),
                        timeout=config.rpc_timeout_s, metadata=client.metadata())
                    return int(reply.bytes_received)

                requests = client.faults.wrap_upload(requests, cancel, done, held)
            future = client.aggregator.UploadUpdate.future(
                requests, timeout=config.transfer_timeout_s, metadata=client.metadata()
            )
            holder.append(future)
            future.add_done_callback(lambda _f: done.set())
            handle = client.stopper.on_stop(future.cancel)
            try:
                try:
                    ack: aggregator_pb2.UploadAck = future.result()
                except grpc.FutureCancelledError:  # we cancelled it: stopping, or the link was cut
                    raise _Cancelled() from None
            except grpc.RpcError as err:
                code = status_of(err)
                if client.stopper.stopped:
                    raise Stopped(client.stopper.reason) from None
                if code == grpc.StatusCode.ALREADY_EXISTS:  # an earlier attempt got through before the link broke
                    log.info("the aggregator already holds this update", extra={"event": "upload_committed"})
                    ack = aggregator_pb2.UploadAck(accepted=True, round_id=assignment.round_id)
                    return UploadResult(ack, failures, tuple(resumed_at))
                if code not in STREAM_BROKEN:
                    raise ServiceError("aggregator.UploadUpdate", code, details_of(err)) from None
                failures += 1
                if failures > config.max_transfer_retries:
                    raise TransferError(f"upload failed {failures} times; last: {code.name}: {details_of(err)}")
                delay = backoff.next_delay()
                log.warning("upload broken (%s: %s); asking the aggregator what it holds, resuming in %.1fs",
                            code.name, details_of(err)[:200], delay,
                            extra={"event": "upload_resume", "code": code.name})
                client.stopper.wait(delay)
                query = client.call("aggregator.QueryUpload", client.aggregator.QueryUpload,
                                    aggregator_pb2.QueryUploadRequest(ticket=assignment.ticket),
                                    target=config.aggregator)
                if query.committed:
                    log.info("the aggregator already committed this update",
                             extra={"event": "upload_committed", "round": assignment.round_id})
                    ack = aggregator_pb2.UploadAck(accepted=True, round_id=assignment.round_id,
                                                   bytes_received=query.bytes_received,
                                                   tensors_received=len(payload.manifest))
                    return UploadResult(ack, failures, tuple(resumed_at))
                start = resume_from_proto(query.resume_from)
                if not start.at_start:
                    try:
                        payload.manifest.bytes_before(start)
                    except WireError:
                        log.warning("aggregator resume point %r is not in this upload; restarting it", start.tensor)
                        start = START
                resumed_at.append(payload.manifest.bytes_before(start))
                log.info("resuming upload at tensor %r offset %d (%d bytes held by the aggregator)",
                         start.tensor, start.offset, query.bytes_received,
                         extra={"event": "upload_resume_point", "tensor": start.tensor, "offset": start.offset})
                continue
            finally:
                client.stopper.remove(handle)
            if not ack.accepted:  # the contract never sends this: a rejection is an error status
                raise TransferError(f"the aggregator answered the upload with accepted=false: {ack}")
            log.info("upload accepted: %d bytes, %d tensors", payload.nbytes, len(payload.manifest),
                     extra={"event": "upload_done", "bytes": payload.nbytes, "round": assignment.round_id})
            return UploadResult(ack, failures, tuple(resumed_at))
    finally:
        bar.close()


def _both(first: Callable[[int], object], second: Callable[[int], object]) -> Callable[[int], None]:
    def call(n: int) -> None:
        first(n)
        second(n)
    return call
