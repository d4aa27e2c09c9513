"""Broken and corrupted transfers between the agent and the real extractor/aggregator: the agent resumes a download
and an upload cut mid-stream, and re-fetches a tensor whose chunk was corrupted (sha256 mismatch). Faults are
injected in the agent's transport layer; the servers are the real ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from raffm.v1 import aggregator_pb2
from tests.integration.agentkit import AgentThread, FaultInjector, Fleet, agent_config, job, rounds, tiny_model

CHUNK = 64 * 1024  # the tiny model's slice is ~3.8 MiB: ~60 chunks


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


def _run(tmp_path: Path, model: Path, faults: FaultInjector, **job_overrides: object) -> tuple[Fleet, object]:
    fleet = Fleet(tmp_path, job(model, **job_overrides)).start()
    runner = AgentThread(agent_config(fleet, "flaky", tmp_path / "state", model, chunk_bytes=CHUNK),
                         faults=faults).start()
    assert runner.join() == 0
    return fleet, runner.agent.outcomes


def _closed_with_one_update(fleet: Fleet) -> None:
    [rnd] = rounds(fleet)
    rnd = fleet.wait_round(fleet.agg_stub(), rnd.round_id)
    assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 1


def test_interrupted_download_resumes_from_where_it_broke(tmp_path: Path, model: Path) -> None:
    faults = FaultInjector(break_download_after=10)
    fleet, outcomes = _run(tmp_path, model, faults)
    try:
        [o] = outcomes
        assert faults.events == ["broke download after 10 chunks"]
        assert o.status == "uploaded" and o.download_resumes == 1 and o.download_refetches == 0
        _closed_with_one_update(fleet)
    finally:
        fleet.stop()


def test_corrupted_chunk_is_detected_and_its_tensor_fetched_again(tmp_path: Path, model: Path) -> None:
    faults = FaultInjector(corrupt_download_chunk=3)
    fleet, outcomes = _run(tmp_path, model, faults)
    try:
        [o] = outcomes
        assert len(faults.events) == 1 and faults.events[0].startswith("corrupted download chunk 3")
        assert o.status == "uploaded" and o.download_refetches == 1
        _closed_with_one_update(fleet)  # the aggregator validated the (correct) delta's shapes and finiteness
    finally:
        fleet.stop()


def test_interrupted_upload_resumes_from_what_the_aggregator_holds(tmp_path: Path, model: Path) -> None:
    faults = FaultInjector(break_upload_after=10)
    fleet, outcomes = _run(tmp_path, model, faults)
    try:
        [o] = outcomes
        assert faults.events == ["broke upload after 10 chunks"]
        assert o.status == "uploaded" and o.upload_resumes == 1
        # QueryUpload said the aggregator kept part of the stream: the resume did not start from zero
        [held] = o.upload_resumed_at
        assert 0 < held <= 10 * CHUNK
        _closed_with_one_update(fleet)
    finally:
        fleet.stop()


def test_fp16_wire_download_and_upload(tmp_path: Path, model: Path) -> None:
    fleet, outcomes = _run(tmp_path, model, FaultInjector(break_download_after=5, break_upload_after=5),
                           wire_dtype="fp16")
    try:
        [o] = outcomes
        assert o.status == "uploaded" and o.download_resumes == 1 and o.upload_resumes == 1
        _closed_with_one_update(fleet)
    finally:
        fleet.stop()
