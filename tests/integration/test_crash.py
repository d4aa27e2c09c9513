"""Crash safety: `kill -9` the aggregator process mid-round (two updates acknowledged, a third half uploaded),
restart it, finish the round, and get bit for bit the model a run without the crash produces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import torch

from edge_agent.transfer import upload_messages, upload_once
from raffm.v1 import aggregator_pb2
from raffm.wire import ResumePoint, iter_chunks
from services.registry.testing import OPERATOR_TOKEN
from tests.integration.fedloop import (
    SECRET, Fleet, budgets_for, download, payload, scripted_delta, spec_of, tiny_bert_folder, tiny_job,
)
from tests.integration.test_round import _expected

REPO = Path(__file__).resolve().parents[2]


def _job_toml(path: Path, model: Path) -> Path:
    path.write_text(
        'job_id = "job"\n'
        f'model = "{model}"\n'
        "num_labels = 3\nrounds = 1\nclients_per_round = 3\nquorum = 3\nround_deadline_s = 300\n"
        "batch_size = 64\nseq_len = 32\nlocal_steps = 2\npoll_wait_s = 0.1\n"
    )
    return path


class AggregatorProcess:
    def __init__(self, root: Path, job_file: Path, fleet: Fleet) -> None:
        self.root, self.job_file, self.fleet = root, job_file, fleet
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> str:
        port_file = self.root / "agg.port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "services.aggregator", "serve", "--data-dir", str(self.root / "agg"),
               "--job", str(self.job_file), "--registry", self.fleet.registry.address,
               "--extractor", self.fleet.extractor.address, "--ticket-secret", SECRET,
               "--operator-token", OPERATOR_TOKEN, "--port", "0", "--metrics-port", "-1",
               "--port-file", str(port_file), "--log-level", "WARNING"]
        self.log = open(self.root / "agg.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 90
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"aggregator did not start: {(self.root / 'agg.log').read_text()[-3000:]}")
            time.sleep(0.05)
        self.port = json.loads(port_file.read_text())["grpc"]
        return f"127.0.0.1:{self.port}"

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _devices(fleet: Fleet, job: Any, root: Path) -> list[Any]:
    config = fleet.store.info("job-v0").config if fleet.store.has("job-v0") else None
    assert config is not None
    budgets = budgets_for(job, config, ("top", "second", "bottom"))
    return [fleet.register(f"dev{i}", train_memory_mb=b, tier=t)
            for i, (b, t) in enumerate(zip(budgets, ("laptop", "jetson", "phone")))]


def _reference(tmp: Path, model: Path) -> tuple[dict[str, torch.Tensor], list[tuple[Any, Any, int]], Fleet]:
    """The same round without a crash (in-process aggregator)."""
    job = tiny_job(model, rounds=1)
    fleet = Fleet(tmp, job).start()
    try:
        devs = _devices(fleet, job, tmp)
        stub = fleet.agg_stub()
        updates = []
        for i, dev in enumerate(devs):
            a = fleet.poll(stub, dev).assignment
            delta = scripted_delta(download(fleet, dev, a), seed=i, assignment=a)
            assert upload_once(stub, a.ticket, 10 + i, payload(delta, "fp32"), metadata=dev.md).accepted
            updates.append((delta, spec_of(a), 10 + i))
        fleet.wait_round(stub, "job-r1")
        return fleet.store.load("job-v1"), updates, fleet
    finally:
        fleet.stop()


@pytest.mark.timeout(300)
def test_kill_9_mid_round_then_restart_gives_the_same_model(tmp_path: Path) -> None:
    model = tiny_bert_folder(tmp_path / "model")
    reference, _, _ = _reference(tmp_path / "ref", model)

    root = tmp_path / "crash"
    root.mkdir()
    job = tiny_job(model, rounds=1)
    fleet = Fleet(root, job).start(aggregator=False)
    agg = AggregatorProcess(root, _job_toml(root / "job.toml", model), fleet)
    try:
        target = agg.start()
        stub = fleet.agg_stub(target)
        devs = _devices(fleet, job, root)
        assignments = [fleet.poll(stub, d).assignment for d in devs]
        deltas = [scripted_delta(download(fleet, d, a), seed=i, assignment=a) for i, (d, a) in enumerate(zip(devs, assignments))]
        for i in (0, 1):
            ack = upload_once(stub, assignments[i].ticket, 10 + i, payload(deltas[i], "fp32"),
                              metadata=devs[i].md)
            assert ack.accepted

        # Device 2 gets 10 chunks in, then the aggregator is killed under it.
        pl2 = payload(deltas[2], "fp32")
        ten_chunks = sum(len(c.data) for c in islice(iter_chunks(pl2.manifest, pl2.source, chunk_bytes=1024), 10))
        release = threading.Event()

        def stalled() -> Iterator[Any]:
            for n, m in enumerate(upload_messages(assignments[2].ticket, 12, pl2, chunk_bytes=1024)):
                if n == 12:
                    release.wait(20)
                    return
                yield m

        call = stub.UploadUpdate.future(stalled(), metadata=devs[2].md, timeout=60)
        query = aggregator_pb2.QueryUploadRequest(ticket=assignments[2].ticket)
        for _ in range(300):
            if stub.QueryUpload(query, metadata=devs[2].md, timeout=10).bytes_received >= ten_chunks:
                break
            time.sleep(0.02)
        agg.kill9()
        release.set()
        with pytest.raises(Exception):
            call.result(timeout=30)

        target = agg.start()  # restart on the same data directory
        stub = fleet.agg_stub(target)
        rnd = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id="job-r1"), metadata=fleet.operator, timeout=10)
        assert rnd.state == aggregator_pb2.ROUND_STATE_OPEN and rnd.accepted == 2, rnd
        # The acknowledged uploads are remembered; the interrupted one resumes where it broke.
        assert stub.QueryUpload(aggregator_pb2.QueryUploadRequest(ticket=assignments[0].ticket),
                                metadata=devs[0].md, timeout=10).committed
        state = stub.QueryUpload(query, metadata=devs[2].md, timeout=10)
        assert not state.committed and state.bytes_received == ten_chunks
        point = ResumePoint(state.resume_from.tensor, state.resume_from.offset)
        ack = stub.UploadUpdate(upload_messages(assignments[2].ticket, 12, pl2, chunk_bytes=1024, resume=point),
                                metadata=devs[2].md, timeout=60)
        assert ack.accepted
        rnd = fleet.wait_round(stub, "job-r1")
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 3, rnd

        got = fleet.store.load("job-v1")
        expected = _expected(fleet, "job-v0", [(deltas[i], spec_of(assignments[i]), 10 + i) for i in range(3)],
                             job)
        assert set(got) == set(reference)
        for name in reference:
            assert torch.equal(got[name], reference[name]), name
            assert torch.equal(got[name], expected[name]), name
    finally:
        agg.stop()
        fleet.stop()
