"""Issue 12, item 4: every rejected upload is visible. It ends with an error status whose ErrorDetail names the
reason (an ack is only ever sent for an accepted update), is logged with its reason, and is counted once in the
metrics and in a round: the round its ticket names, or the open round when the ticket is not one of ours."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest

from edge_agent.transfer import upload_messages, upload_once
from raffm.v1 import aggregator_pb2
from services.common.errors import parse_error_detail
from tests.integration.fedloop import Fleet, download, payload, scripted_delta, tiny_bert_folder, tiny_job

StatusCode = grpc.StatusCode


@pytest.fixture()
def fleet(tmp_path: Path):
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=1, rounds=2)
    f = Fleet(tmp_path, job).start()
    f.register("a", train_memory_mb=64, tier="laptop")
    f.register("b", train_memory_mb=64, tier="laptop")
    yield f
    f.stop()


def _refused(stub: Any, msgs: list, md: Any, code: StatusCode, reason: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.UploadUpdate(iter(msgs), metadata=md, timeout=30)
    assert err.value.code() == code, err.value.details()
    detail = parse_error_detail(err.value.trailing_metadata())
    assert detail is not None and detail.reject_reason == reason, (reason, detail)


def _rejected_total(fleet: Fleet) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in generate_latest(fleet.metrics).decode().splitlines():
        if line.startswith("raffm_aggregator_updates_rejected_total{"):
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_every_rejection_is_an_error_status_logged_and_counted_once(fleet: Fleet,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.aggregator")
    stub = fleet.agg_stub()
    dev_a, dev_b = fleet.devices["a"], fleet.devices["b"]
    a, b = fleet.poll(stub, dev_a).assignment, fleet.poll(stub, dev_b).assignment
    good = payload(scripted_delta(download(fleet, dev_a, a), seed=1, assignment=a), "fp32")
    late = payload(scripted_delta(download(fleet, dev_b, b), seed=2, assignment=b), "fp32")

    def msgs(ticket: bytes, pl: Any, samples: int = 5) -> list:
        return list(upload_messages(ticket, samples, pl, chunk_bytes=4096))

    forged = a.ticket[:-4] + (b"AAAA" if not a.ticket.endswith(b"AAAA") else b"BBBB")
    _refused(stub, msgs(forged, good), dev_a.md, StatusCode.UNAUTHENTICATED, "bad_ticket")  # before any session
    _refused(stub, msgs(a.ticket, good), dev_b.md, StatusCode.PERMISSION_DENIED, "wrong_device")
    _refused(stub, msgs(a.ticket, good, samples=0), dev_a.md, StatusCode.INVALID_ARGUMENT, "invalid_header")
    counted = list(upload_messages(a.ticket, 5, good, metrics={"label_counts": [2, 2, 1, 0]}, chunk_bytes=4096))
    _refused(stub, counted, dev_a.md, StatusCode.INVALID_ARGUMENT, "invalid_header")  # 4 labels; the model has 3
    _refused(stub, msgs(a.ticket, good)[1:], dev_a.md, StatusCode.INVALID_ARGUMENT, "invalid_header")
    _refused(stub, msgs(a.ticket, good)[:-1], dev_a.md, StatusCode.INVALID_ARGUMENT, "incomplete")
    r1 = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id=a.round_id), metadata=fleet.operator, timeout=10)
    assert r1.rejected == 6 and r1.accepted == 0

    ack = upload_once(stub, a.ticket, 5, good, metadata=dev_a.md, chunk_bytes=4096)
    assert ack.accepted  # the one kind of ack there is
    r1 = fleet.wait_round(stub, a.round_id)
    assert r1.state == aggregator_pb2.ROUND_STATE_CLOSED
    assert list(r1.label_counts) == []  # the accepted update kept its labels to itself
    _refused(stub, msgs(a.ticket, good), dev_a.md, StatusCode.ALREADY_EXISTS, "duplicate")
    _refused(stub, msgs(b.ticket, late), dev_b.md, StatusCode.FAILED_PRECONDITION, "late")
    _refused(stub, msgs(forged, good), dev_a.md, StatusCode.UNAUTHENTICATED, "bad_ticket")  # round 2 is open now

    rounds = {r.index: r for r in stub.ListRounds(aggregator_pb2.ListRoundsRequest(), metadata=fleet.operator,
                                                  timeout=10).rounds}
    assert rounds[1].rejected == 8  # 6 while open, then the duplicate and the late upload of its tickets
    assert rounds[2].rejected == 1  # a ticket that is not ours counts in the open round
    assert _rejected_total(fleet) == {"bad_ticket": 2, "wrong_device": 1, "invalid_header": 3, "incomplete": 1,
                                      "duplicate": 1, "late": 1}
    logged = [r.getMessage() for r in caplog.records if "rejected an upload" in r.getMessage()]
    for reason in ("bad_ticket", "wrong_device", "invalid_header", "incomplete", "duplicate", "late"):
        assert any(f"({reason})" in line for line in logged), (reason, logged)
