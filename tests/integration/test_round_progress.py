"""Issue 12, item 6: progress inside a round, as `raffm demo` shows it, read from real services: devices done of
those expected (failures counted), bytes moved so far (streamed down by the extractor, received by the aggregator,
before any round figure exists), and the elapsed time."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from edge_agent.transfer import upload_once
from raffm.v1 import aggregator_pb2
from raffm_app.follow import RoundProgress
from tests.integration.fedloop import Fleet, download, payload, scripted_delta, tiny_bert_folder, tiny_job


@pytest.fixture()
def fleet(tmp_path: Path):
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=2, rounds=1)
    f = Fleet(tmp_path, job, serve_metrics=True).start()
    for name in ("a", "b"):
        f.register(name, train_memory_mb=64, tier="laptop")
    yield f
    f.stop()


def test_progress_lines_count_devices_and_bytes_while_the_round_runs(fleet: Fleet) -> None:
    stub = fleet.agg_stub()
    ports = {"extractor": fleet.extractor.server.metrics_port, "aggregator": fleet.aggregator.server.metrics_port}
    out = io.StringIO()
    progress = RoundProgress(2, 1, ports, every_s=0.0, live=False, out=out)

    def shown() -> str:
        [rnd] = stub.ListRounds(aggregator_pb2.ListRoundsRequest(), metadata=fleet.operator, timeout=10).rounds
        progress.update(rnd)
        return out.getvalue().splitlines()[-1]

    assert re.fullmatch(r"round 1: 0/2 devices done, 0\.0 MiB moved, \d+ s", shown())
    a, b = (fleet.poll(stub, fleet.devices[n]).assignment for n in ("a", "b"))
    received = download(fleet, fleet.devices["a"], a)
    pl = payload(scripted_delta(received, seed=1, assignment=a), "fp32")
    down = sum(t.numel() * t.element_size() for t in received.values())
    assert shown().startswith(f"round 1: 0/2 devices done, {down / 2**20:.1f} MiB moved")  # before any upload
    assert upload_once(stub, a.ticket, 5, pl, metadata=fleet.devices["a"].md).accepted
    assert shown().startswith(f"round 1: 1/2 devices done, {(down + pl.nbytes) / 2**20:.1f} MiB moved")
    stub.ReportFailure(aggregator_pb2.ReportFailureRequest(ticket=b.ticket, reason=aggregator_pb2.FAILURE_REASON_DATA,
                                                           detail="no data"), metadata=fleet.devices["b"].md,
                       timeout=10)
    [rnd] = stub.ListRounds(aggregator_pb2.ListRoundsRequest(), metadata=fleet.operator, timeout=10).rounds
    if rnd.state not in (aggregator_pb2.ROUND_STATE_CLOSED, aggregator_pb2.ROUND_STATE_FAILED):
        assert re.match(r"round 1: 2/2 devices done \(1 failed\)", shown())
    assert progress.line(rnd, 0, rnd.opened_at.ToMicroseconds() / 1e6 + 7).startswith("round 1: 2/2 devices done (1 failed), "
                                                                       "0.0 MiB moved, 7 s")
