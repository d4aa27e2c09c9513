"""Moving weight slices: the resumable, verified download of an assignment's slice and upload of its delta.

Download: the extractor streams a manifest (names, shapes, sha256) then chunks. A broken stream is re-opened with
``resume_from`` = the first byte not yet held; a tensor whose sha256 does not match is dropped and fetched again
from its first byte. Upload: header, manifest, chunks; if the stream breaks, ``QueryUpload`` says what the aggregator
already holds and the upload continues from there (or stops, when the update was already committed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from edge_agent.client import STREAM_BROKEN, Backoff, ServiceClient, ServiceError, Stopped, details_of, status_of
from edge_agent.progress import Progress
from raffm import proto, wire
from raffm.reassembly import MemorySink, Reassembler
from raffm.v1 import aggregator_pb2, common_pb2, extractor_pb2

log = logging.getLogger("edge_agent.transfer")

MAX_REFETCH_PER_TENSOR = 3


class _Cancelled(grpc.RpcError):
    """A call this side cancelled, seen as a broken stream."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "cancelled by the agent"


class TransferError(Exception):
    """A transfer could not be completed (retries exhausted, protocol violation, rejected upload)."""


class UploadRejected(TransferError):
    def __init__(self, ack: aggregator_pb2.UploadAck) -> None:
        reason = aggregator_pb2.RejectReason.Name(ack.reject_reason)
        super().__init__(f"upload rejected: {reason}: {ack.detail}")
        self.ack = ack
        self.reason = reason


@dataclass
class UploadResult:
    ack: aggregator_pb2.UploadAck
    resumes: int = 0
    resumed_at: tuple[int, ...] = ()  # bytes the aggregator already held at each resume


@dataclass
class DownloadResult:
    manifest: wire.Manifest
    manifest_proto: common_pb2.Manifest
    tensors: dict[str, torch.Tensor]  # in the wire dtype, manifest order
    bytes_received: int  # including re-fetched and resumed bytes
    resumes: int
    refetches: int


def download_slice(
    client: ServiceClient, assignment: aggregator_pb2.Assignment, progress: Progress
) -> DownloadResult:
    """Download and verify the slice of ``assignment``; resumes broken streams and re-fetches corrupt tensors."""
    config = client.config
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    sink = MemorySink()
    reassembler: Reassembler | None = None
    manifest_proto: common_pb2.Manifest | None = None
    resumes = refetches = 0
    refetched: dict[str, int] = {}
    failures = 0
    bar = progress.bar("download", 0, "B", unit_scale=True, event="download", round=assignment.round_id)
    try:
        while True:
            client.stopper.check()
            point = reassembler.resume_point if reassembler is not None else wire.START
            request = extractor_pb2.DownloadRequest(ticket=assignment.ticket, chunk_bytes=config.chunk_bytes)
            if not point.at_start:
                request.resume_from.CopyFrom(proto.resume_to_proto(point))
            call = client.extractor(assignment.extractor_target).DownloadSlice(
                request, timeout=config.transfer_timeout_s, metadata=client.metadata()
            )
            handle = client.stopper.on_stop(call.cancel)
            stream: Iterator[Any] = call
            if client.faults is not None:
                stream = client.faults.wrap_download(call, call.cancel)
            corrupt: str | None = None
            try:
                for msg in stream:
                    body = msg.WhichOneof("body")
                    if body == "manifest":
                        manifest = proto.manifest_from_proto(msg.manifest)
                        if reassembler is None:
                            manifest_proto = msg.manifest
                            reassembler = Reassembler(manifest, sink)
                            bar.total = manifest.total_bytes
                            if bar._bar is not None:  # noqa: SLF001 - tqdm learns the total late
                                bar._bar.total = manifest.total_bytes  # noqa: SLF001
                        elif manifest != reassembler.manifest:
                            raise TransferError("the slice changed between resumed downloads; the round must restart")
                    elif body == "chunk":
                        if reassembler is None:
                            raise TransferError("the extractor sent a chunk before the manifest")
                        chunk = msg.chunk
                        try:
                            reassembler.accept(chunk.tensor, int(chunk.offset), bytes(chunk.data))
                        except wire.ChecksumError as exc:
                            corrupt = chunk.tensor
                            log.warning("%s; fetching it again", exc,
                                        extra={"event": "download_refetch", "tensor": chunk.tensor})
                            call.cancel()
                            break
                        bar.update(len(chunk.data))
                    else:
                        raise TransferError(f"unexpected message {body!r} in the slice stream")
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
                at = reassembler.resume_point if reassembler else wire.START
                delay = backoff.next_delay()
                log.warning("download broken (%s: %s) at tensor %r offset %d; resuming in %.1fs",
                            code.name, details_of(err)[:200], at.tensor, at.offset, delay,
                            extra={"event": "download_resume", "code": code.name, "tensor": at.tensor,
                                   "offset": at.offset})
                client.stopper.wait(delay)
                continue
            except wire.WireError as exc:
                raise TransferError(f"the slice stream is malformed: {exc}") from exc
            finally:
                client.stopper.remove(handle)
            if corrupt is not None:
                refetches += 1
                refetched[corrupt] = refetched.get(corrupt, 0) + 1
                if refetched[corrupt] > MAX_REFETCH_PER_TENSOR:
                    raise TransferError(f"tensor {corrupt!r} failed its sha256 check {refetched[corrupt]} times")
                bar.reset_to(reassembler.bytes_held if reassembler else 0)
                continue
            if reassembler is None or manifest_proto is None:
                raise TransferError("the extractor closed the stream without sending a manifest")
            if not reassembler.done:  # the server ended the stream early: resume like a broken link
                failures += 1
                if failures > config.max_transfer_retries:
                    raise TransferError(f"download incomplete after {failures} attempts")
                resumes += 1
                continue
            tensors = {name: sink.tensors[name] for name in reassembler.manifest.names}
            log.info("downloaded %d tensors, %.1f MiB (%d resumes, %d re-fetched)", len(tensors),
                     reassembler.manifest.total_bytes / 2**20, resumes, refetches,
                     extra={"event": "download_done", "bytes": reassembler.manifest.total_bytes,
                            "resumes": resumes, "refetches": refetches, "round": assignment.round_id})
            return DownloadResult(reassembler.manifest, manifest_proto, tensors, reassembler.bytes_received,
                                  resumes, refetches)
    finally:
        bar.close()


def upload_update(
    client: ServiceClient,
    assignment: aggregator_pb2.Assignment,
    delta: Mapping[str, torch.Tensor],
    names: list[str],
    header: aggregator_pb2.UpdateHeader,
    progress: Progress,
) -> UploadResult:
    """Upload ``delta`` (float tensors, named as in the download) in the assignment's wire dtype, resuming on breaks."""
    config = client.config
    dtype = proto.wire_dtype_from_proto(assignment.hparams.wire_dtype)
    payload = wire.WirePayload.from_state(delta, dtype, names)
    chunk_bytes = config.chunk_bytes or wire.DEFAULT_CHUNK_BYTES
    chunk_bytes = max(wire.MIN_CHUNK_BYTES, min(wire.MAX_CHUNK_BYTES, chunk_bytes))
    manifest_msg = proto.manifest_to_proto(
        payload.manifest, model_version=assignment.model_version, spec=assignment.spec, chunk_bytes=chunk_bytes,
        architecture=assignment.task.architecture, wire_dtype=proto.wire_dtype_to_proto(dtype),
    )
    backoff = Backoff(config.backoff_initial_s, config.backoff_max_s)
    start = wire.START
    failures = 0
    resumed_at: list[int] = []
    bar = progress.bar("upload", payload.nbytes, "B", unit_scale=True, event="upload", round=assignment.round_id)
    try:
        while True:
            client.stopper.check()
            bar.reset_to(payload.manifest.bytes_before(start))

            def messages(start: wire.ResumePoint = start) -> Iterator[aggregator_pb2.UploadMessage]:
                yield aggregator_pb2.UploadMessage(header=header)
                yield aggregator_pb2.UploadMessage(manifest=manifest_msg)
                for c in wire.iter_chunks(payload.manifest, payload.source, start, chunk_bytes):
                    yield aggregator_pb2.UploadMessage(
                        chunk=common_pb2.TensorChunk(tensor=c.tensor, offset=c.offset, data=c.data))
                    bar.update(len(c.data))

            done = threading.Event()
            holder: list[Any] = []

            def cancel() -> None:
                if holder:
                    holder[0].cancel()

            requests: Iterator[Any] = messages()
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
                start = proto.resume_from_proto(query.resume_from)
                if not start.at_start:
                    try:
                        payload.manifest.bytes_before(start)
                    except wire.WireError:
                        log.warning("aggregator resume point %r is not in this upload; restarting it", start.tensor)
                        start = wire.START
                resumed_at.append(payload.manifest.bytes_before(start))
                log.info("resuming upload at tensor %r offset %d (%d bytes held by the aggregator)",
                         start.tensor, start.offset, query.bytes_received,
                         extra={"event": "upload_resume_point", "tensor": start.tensor, "offset": start.offset})
                continue
            finally:
                client.stopper.remove(handle)
            if ack.accepted:
                log.info("upload accepted: %d bytes, %d tensors", payload.nbytes, len(payload.manifest),
                         extra={"event": "upload_done", "bytes": payload.nbytes, "round": assignment.round_id})
                return UploadResult(ack, failures, tuple(resumed_at))
            if ack.reject_reason == aggregator_pb2.REJECT_REASON_DUPLICATE:
                return UploadResult(ack, failures, tuple(resumed_at))  # an earlier attempt already got through
            raise UploadRejected(ack)
    finally:
        bar.close()
