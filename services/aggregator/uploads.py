"""Uploads: one UploadUpdate stream as an :class:`UploadSession` (manifest check against the assignment, chunks
reassembled and verified into staging, then commit), what a resuming device is told it already sent, and the bytes an
accepted update adds to its round's figures and metrics.

The commit itself (validate, make durable, record, fold) is the coordinator's transaction; the session hands it the
verified tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from raffm.aggregation import SlicedFedAvg
from raffm.errors import AlreadyExistsError, ConflictError, PreconditionError, ValidationError, excerpt
from raffm.reassembly import Reassembler
from raffm.slicing import SlicePlan
from raffm.tickets import Ticket
from raffm.wire import END, START, ChecksumError, Manifest, ResumePoint, WireError
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.staging import StagedUpload, Staging
from services.aggregator.store import AssignmentRecord, RoundRecord, RoundStore


class UploadRejectedError(ValidationError):
    """A bad update (INVALID_ARGUMENT); ``reason`` is a metrics label and maps to raffm.v1.RejectReason."""

    def __init__(self, reason: str, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason


class LateUploadError(PreconditionError):
    reason = "late"
    default_hint = "the round is closed or past its deadline; poll for a new assignment"


class DuplicateUploadError(AlreadyExistsError):
    reason = "duplicate"
    default_hint = "this ticket's update was already accepted; nothing to resend"


class UploadInProgressError(ConflictError):
    """A second UploadUpdate stream on a ticket whose upload is being received (ABORTED)."""

    reason = "concurrent_upload"
    default_hint = ("one upload stream per ticket at a time: wait for the other one to end, then ask QueryUpload "
                    "what is held and resume")


@dataclass(frozen=True)
class UploadResult:
    round_id: str
    bytes_received: int
    tensors: int
    seq: int


@dataclass(frozen=True)
class UploadState:
    committed: bool
    resume_from: ResumePoint
    complete_tensors: list[str]
    bytes_received: int


def upload_state(rounds: RoundStore, staging: Staging, ticket: Ticket) -> UploadState:
    """What the aggregator holds of a ticket's upload: committed, or where a resumed upload continues."""
    done = rounds.update_for_ticket(ticket.ticket_id)
    if done is not None:
        return UploadState(True, END, [], done.nbytes)
    if not staging.exists(ticket.round_id, ticket.ticket_id):
        return UploadState(False, START, [], 0)
    staged = staging.upload(ticket.round_id, ticket.ticket_id)
    point = staged.resume_point()
    return UploadState(False, point, staged.complete_tensors(), staged.bytes_held())


def check_manifest(manifest: Manifest, plan: SlicePlan, wire_dtype: str) -> None:
    """The manifest must name exactly the assigned slice's tensors, with their shapes, in the job's wire dtype."""
    expected = set(plan)
    got = set(manifest.names)
    if got != expected:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise UploadRejectedError(
            "bad_manifest", f"manifest tensors differ from the assigned slice: missing {_names(missing)}, "
            f"unexpected {_names(extra)}", field="manifest")
    for meta in manifest.tensors:
        want = plan[meta.name].sub_shape
        if meta.shape != want:
            raise UploadRejectedError("bad_manifest", f"tensor {excerpt(meta.name)} has shape {meta.shape}; the "
                                      f"assigned slice has {want}", field="manifest")
        if meta.dtype != wire_dtype:
            raise UploadRejectedError("bad_manifest", f"tensor {excerpt(meta.name)} is {meta.dtype}; the job's wire "
                                      f"dtype is {wire_dtype}", field="manifest")


def _names(names: list[str], most: int = 5) -> str:
    """The first few of ``names``, each cut short, and how many more there are."""
    shown = ", ".join(excerpt(n) for n in names[:most])
    return f"[{shown}{f', ... {len(names) - most} more' if len(names) > most else ''}]"


def downloaded_bytes(assignment: AssignmentRecord, reported: float) -> int:
    """What the device says it downloaded for the assignment (tensors it held already are not sent again), within
    what a complete download of the slice streams; the whole slice when it says nothing."""
    return min(int(reported), assignment.download_bytes) if reported > 0 else assignment.download_bytes


def with_accepted_bytes(rnd: RoundRecord, nbytes: int, down: int, full_model_bytes: int) -> RoundRecord:
    """The round's figures with one more accepted update: its upload, what its device downloaded (``down``), and
    what full-model FedAvg would have moved for the same device (down plus up)."""
    return replace(rnd, bytes_up=rnd.bytes_up + nbytes, bytes_down=rnd.bytes_down + down,
                   full_model_bytes=rnd.full_model_bytes + 2 * full_model_bytes)


def export_accepted_bytes(metrics: AggregatorMetrics, tier: str, nbytes: int, down: int, full_model_bytes: int,
                          wire_dtype: str) -> None:
    """The same bytes in the metrics, by device tier."""
    metrics.accepted.labels(tier).inc()
    metrics.bytes_up.labels(tier, wire_dtype).inc(nbytes)
    metrics.bytes_down.labels(tier, wire_dtype).inc(down)
    metrics.full_model_bytes.labels(wire_dtype).inc(2 * full_model_bytes)


Commit = Callable[["UploadSession", dict[str, torch.Tensor]], UploadResult]
# A LoRA upload as the dense update that is folded: (update, its slice plan); raises UpdateRejected.
Dense = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], SlicePlan]]


class UploadSession:
    """One UploadUpdate stream: manifest check, chunk reassembly into staging, then ``commit``.

    A session holds its ticket's claim (only one stream per ticket writes its staging directory, so what is folded is
    exactly the bytes the acknowledged stream sent) until :meth:`close`.
    """

    def __init__(self, ticket: Ticket, assignment: AssignmentRecord, plan: SlicePlan, staged: StagedUpload,
                 sample_count: int, metrics: dict[str, Any], agg: SlicedFedAvg, *, wire_dtype: str,
                 commit: Commit, release: Callable[[], None] = lambda: None,
                 on_bytes: Callable[[int], None] = lambda n: None, dense: Dense | None = None) -> None:
        """``plan``: what the upload must hold (for LoRA, the adapters); ``dense``: for a LoRA upload, how it becomes
        the dense update that is folded."""
        self.ticket, self.assignment, self.plan, self.dense = ticket, assignment, plan, dense
        self.staged, self.sample_count, self.metrics, self.agg = staged, sample_count, metrics, agg
        self.wire_dtype, self._commit, self._release, self._on_bytes = wire_dtype, commit, release, on_bytes
        self.reassembler: Reassembler | None = None
        self.received = 0
        self._started = time.monotonic()  # the header arrived: the aggregator's view of the upload's duration
        self.closed = False

    @property
    def seconds(self) -> float:
        """Seconds since the upload's header arrived."""
        return time.monotonic() - self._started

    def close(self) -> None:
        """Release the ticket's claim (idempotent): another stream may now upload for it."""
        if not self.closed:
            self.closed = True
            self._release()

    @property
    def round_id(self) -> str:
        return self.ticket.round_id

    def set_manifest(self, manifest: Manifest) -> ResumePoint:
        """Check names, shapes and dtype against the assignment; returns where chunks must start."""
        check_manifest(manifest, self.plan, self.wire_dtype)
        self.staged.save_manifest(manifest)
        start = self.staged.resume_point()
        self.reassembler = Reassembler(manifest, self.staged, start)
        return start

    def accept(self, tensor: str, offset: int, data: bytes | memoryview) -> None:
        if self.reassembler is None:
            raise UploadRejectedError("protocol", "a chunk arrived before the manifest", field="chunk")
        r = self.reassembler
        if self.received == 0 and offset == 0 and r.bytes_held and tensor == r.manifest.tensors[0].name:
            # A sender may always start over: drop the staged partial upload instead of demanding a resume.
            self.staged.reset()
            self.staged.save_manifest(r.manifest)
            self.reassembler = r = Reassembler(r.manifest, self.staged)
        try:
            r.accept(tensor, offset, data)
        except WireError as exc:
            raise UploadRejectedError("checksum" if isinstance(exc, ChecksumError) else "protocol", str(exc),
                                      field="chunk") from None
        self.received += len(data)
        self._on_bytes(len(data))

    def interrupted(self) -> None:
        """The stream broke: keep what arrived (flushed to the OS) for a resume."""
        self.staged.flush()

    def finish(self) -> UploadResult:
        if self.reassembler is None:
            raise UploadRejectedError("protocol", "the upload ended before its manifest", field="manifest")
        try:
            self.reassembler.finish()
        except WireError as exc:
            raise UploadRejectedError("incomplete", str(exc)) from None
        self.staged.flush()
        delta = self.staged.tensors()
        try:
            return self._commit(self, delta)
        except UploadRejectedError:
            self.staged.remove()  # a bad update is never kept
            raise
