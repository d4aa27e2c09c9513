"""Durable staging of uploads: one data file and one progress record per upload, made durable once at the commit;
a tensor that a restarted process did not verify itself is hashed again before it counts as received; an upload
staged by the previous one-file-per-tensor layout is read back when committed and dropped when not."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from raffm.reassembly import Reassembler
from raffm.wire import END, START, ResumePoint, WirePayload, iter_chunks
from services.aggregator import staging as staging_module
from services.aggregator.staging import Staging


def _payload(tensors: int = 3) -> WirePayload:
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(64, 8, generator=g) for i in range(tensors)}
    return WirePayload.from_state(state, "float32")


def _receive(staging: Staging, payload: WirePayload, tensors: int, extra_chunks: int = 0) -> None:
    """Stage the first ``tensors`` tensors of ``payload`` for ticket ``k`` of round ``r``, and ``extra_chunks`` chunks
    of the next one (a stream that then broke)."""
    staged = staging.upload("r", "k")
    staged.save_manifest(payload.manifest)
    r = Reassembler(payload.manifest, staged, staged.resume_point())
    names = payload.manifest.names[:tensors]
    for c in iter_chunks(payload.manifest, payload.source, staged.resume_point(), 1024):
        if c.tensor not in names:
            if extra_chunks == 0:
                break
            extra_chunks -= 1
        r.accept(c.tensor, c.offset, c.data)
    staged.flush()


def test_complete_upload_syncs_and_reads_back(tmp_path: Path) -> None:
    payload = _payload()
    staging = Staging(tmp_path)
    _receive(staging, payload, 3)
    staged = staging.upload("r", "k")
    assert staged.resume_point() == END
    staged.sync()
    back = staged.tensors()
    assert all(torch.equal(back[n], payload.tensors[n]) for n in payload.manifest.names)


def test_one_data_file_and_a_bounded_number_of_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost of a durable upload is its fsyncs: a few per upload at its commit, none per tensor."""
    payload = _payload(40)
    staging = Staging(tmp_path, fsync_threads=0)
    calls: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    _receive(staging, payload, 40)
    assert calls == []  # nothing is fsynced while the upload is received
    staging.upload("r", "k").sync()
    assert len(calls) <= 5  # data file, progress record, manifest, two directories
    assert sorted(p.name for p in (tmp_path / "r" / "k").iterdir()) == ["data", "manifest.json", "progress"]


def test_writeback_starts_in_the_background_while_the_upload_is_received(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With a syncer the disk starts writing before the commit: the data file is fsynced in the syncer's thread, off
    the receiving thread, as the bytes come in."""
    monkeypatch.setattr(staging_module, "_WRITEBACK_BYTES", 4096)
    payload = _payload(40)  # 2 KiB a tensor
    staging = Staging(tmp_path, fsync_threads=1)
    synced, threads = threading.Event(), []
    real = os.fsync

    def counted(fd: int) -> None:
        threads.append(threading.get_ident())
        synced.set()
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    _receive(staging, payload, 20)  # half of it: the commit has not been reached
    assert synced.wait(10)
    _receive(staging, payload, 40)
    assert threading.get_ident() not in threads
    staged = staging.upload("r", "k")
    staged.sync()
    back = staged.tensors()
    assert all(torch.equal(back[n], payload.tensors[n]) for n in payload.manifest.names)


def test_resume_inside_a_tensor_after_a_restart(tmp_path: Path) -> None:
    payload = _payload()
    _receive(Staging(tmp_path), payload, 1, extra_chunks=1)
    restarted = Staging(tmp_path)
    staged = restarted.upload("r", "k")
    assert staged.resume_point() == ResumePoint("t1", 1024)
    assert staged.bytes_held() == payload.manifest.tensors[0].nbytes + 1024
    _receive(restarted, payload, 3)  # re-hashes t1's first 1024 bytes from the data file, then the rest
    assert restarted.upload("r", "k").resume_point() == END


def test_restart_rehashes_tensors_it_did_not_verify(tmp_path: Path) -> None:
    payload = _payload()
    _receive(Staging(tmp_path), payload, 2)
    # A power loss before the commit's fsync: the record says t1 is complete but its bytes never reached the disk.
    data = tmp_path / "r" / "k" / "data"
    t0 = payload.manifest.tensors[0].nbytes
    with open(data, "r+b") as f:
        f.seek(t0)
        f.write(bytes(payload.manifest.tensors[1].nbytes))

    restarted = Staging(tmp_path).upload("r", "k")
    assert restarted.resume_point() == ResumePoint("t1", 0)  # t1 is dropped and will be sent again
    assert restarted.complete_tensors() == ["t0"]


def test_a_torn_or_foreign_record_holds_nothing(tmp_path: Path) -> None:
    payload = _payload()
    _receive(Staging(tmp_path), payload, 2)
    record = tmp_path / "r" / "k" / "progress"
    raw = bytearray(record.read_bytes())
    raw[30] ^= 0xFF
    record.write_bytes(bytes(raw))
    assert Staging(tmp_path).upload("r", "k").resume_point() == ResumePoint("t0", 0)


def test_resume_point_within_a_process_and_drop_round(tmp_path: Path) -> None:
    payload = _payload()
    staging = Staging(tmp_path)
    _receive(staging, payload, 2)
    assert staging.upload("r", "k").resume_point() == ResumePoint("t2", 0)
    staging.drop_round("r")
    assert staging.upload("r", "k").resume_point() == START


def _legacy(tmp_path: Path, payload: WirePayload, complete: int, part: int = 0) -> Path:
    """An upload as the previous layout staged it: manifest.json, one NNNNN.bin per complete tensor, a .part."""
    d = tmp_path / "r" / "k"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"tensors": [
        {"name": m.name, "dtype": m.dtype, "shape": list(m.shape), "nbytes": m.nbytes, "sha256": m.sha256.hex()}
        for m in payload.manifest.tensors]}))
    for i, meta in enumerate(payload.manifest.tensors[:complete]):
        (d / f"{i:05d}.bin").write_bytes(bytes(payload.source(meta)))
    if part:
        meta = payload.manifest.tensors[complete]
        (d / f"{complete:05d}.part").write_bytes(bytes(payload.source(meta))[:part])
    return d


def test_a_committed_upload_of_the_previous_layout_reads_back(tmp_path: Path) -> None:
    payload = _payload()
    _legacy(tmp_path, payload, 3)
    back = Staging(tmp_path).upload("r", "k").tensors()
    assert all(torch.equal(back[n], payload.tensors[n]) for n in payload.manifest.names)


def test_an_uncommitted_upload_of_the_previous_layout_starts_over(tmp_path: Path) -> None:
    payload = _payload()
    d = _legacy(tmp_path, payload, 2, part=100)
    staging = Staging(tmp_path)
    assert staging.upload("r", "k").resume_point() == START
    assert list(d.iterdir()) == []
    _receive(staging, payload, 3)
    staged = staging.upload("r", "k")
    assert staged.resume_point() == END
    assert all(torch.equal(staged.tensors()[n], payload.tensors[n]) for n in payload.manifest.names)
