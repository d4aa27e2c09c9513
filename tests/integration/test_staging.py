"""Durable staging of uploads: fsyncs run in the background and are awaited before the commit, and a ``.bin`` that a
restarted process did not verify itself is hashed again before it counts as received."""

from __future__ import annotations

from pathlib import Path

import torch

from raffm.reassembly import Reassembler
from raffm.wire import START, ResumePoint, WirePayload, iter_chunks
from services.aggregator.staging import Staging


def _payload() -> WirePayload:
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(64, 8, generator=g) for i in range(3)}
    return WirePayload.from_state(state, "float32")


def _receive(staging: Staging, payload: WirePayload, tensors: int) -> None:
    """Stage the first ``tensors`` tensors of ``payload`` for ticket ``k`` of round ``r`` (a stream that then broke)."""
    staged = staging.upload("r", "k")
    staged.save_manifest(payload.manifest)
    r = Reassembler(payload.manifest, staged, staged.resume_point())
    names = payload.manifest.names[:tensors]
    for c in iter_chunks(payload.manifest, payload.source, staged.resume_point(), 1024):
        if c.tensor not in names:
            break
        r.accept(c.tensor, c.offset, c.data)
    staged.flush()


def test_complete_upload_syncs_and_reads_back(tmp_path: Path) -> None:
    payload = _payload()
    staging = Staging(tmp_path)
    _receive(staging, payload, 3)
    staged = staging.upload("r", "k")
    staged.sync()  # waits for the background fsyncs
    back = staged.tensors()
    assert all(torch.equal(back[n], payload.tensors[n]) for n in payload.manifest.names)


def test_restart_rehashes_bins_it_did_not_verify(tmp_path: Path) -> None:
    payload = _payload()
    _receive(Staging(tmp_path), payload, 2)
    # A power loss before the background fsync: the second tensor's file is complete in name only.
    bins = sorted((tmp_path / "r" / "k").glob("*.bin"))
    assert len(bins) == 2
    bins[1].write_bytes(bytes(bins[1].stat().st_size))

    restarted = Staging(tmp_path).upload("r", "k")
    assert restarted.resume_point() == ResumePoint("t1", 0)  # t1 is dropped and will be sent again
    assert restarted.complete_tensors() == ["t0"]
    assert not bins[1].exists()


def test_resume_point_within_a_process_and_drop_round(tmp_path: Path) -> None:
    payload = _payload()
    staging = Staging(tmp_path)
    _receive(staging, payload, 2)
    assert staging.upload("r", "k").resume_point() == ResumePoint("t2", 0)
    staging.drop_round("r")
    assert staging.upload("r", "k").resume_point() == START
