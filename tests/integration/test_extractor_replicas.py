"""Extractor replicas on an S3-compatible object store: stateless, so any replica serves any ticket.

Two extractors and the aggregator share nothing but the bucket (a real S3 server process): a download broken on one
replica resumes on the other with identical bytes, the next model version the aggregator writes is served by either,
and with one replica gone the other serves alone. No checkpoint directory exists anywhere on disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest

from edge_agent.transfer import download_once, upload_once
from raffm.reassembly import MemorySink
from raffm.wire import START
from tests.integration.fedloop import Fleet, download, payload, scripted_delta, tiny_bert_folder, tiny_job


@pytest.fixture()
def fleet(tmp_path: Path, s3_url: str):
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=2, rounds=3)
    f = Fleet(tmp_path, job, store_url=s3_url).start()
    f.register("a", train_memory_mb=64, tier="laptop")
    f.register("b", train_memory_mb=64, tier="phone")
    yield f
    f.stop()


def _assign(fleet: Fleet, name: str):
    reply = fleet.poll(fleet.agg_stub(), fleet.devices[name])
    assert reply.WhichOneof("action") == "assignment", reply
    return reply.assignment


def _built(app) -> float:
    text = generate_latest(app.server.registry).decode()
    line = next(x for x in text.splitlines() if x.startswith("raffm_extractor_slice_cache_misses_total"))
    return float(line.split()[-1])


def test_any_replica_serves_any_ticket_and_resumes_another_replicas_download(fleet: Fleet, tmp_path: Path) -> None:
    first, second = fleet.extractor, fleet.add_extractor()
    a = _assign(fleet, "a")
    dev = fleet.devices["a"]

    # Broken after 3 chunks on the first replica, resumed on the second: the same bytes, verified per tensor.
    sink = MemorySink()
    part = download_once(fleet.ext_stub(first), a.ticket, sink, metadata=dev.md, chunk_bytes=1024, max_chunks=3)
    point = part.reassembler.resume_point
    assert point != START and not part.reassembler.done
    rest = download_once(fleet.ext_stub(second), a.ticket, sink, metadata=dev.md, chunk_bytes=1024, resume=point)
    rest.reassembler.finish()
    whole = download(fleet, dev, a)
    assert set(sink.tensors) == set(whole)
    assert all(torch.equal(sink.tensors[n], whole[n]) for n in whole)
    assert _built(first) == 1 and _built(second) == 1  # each replica built the slice from the store itself

    # A round closes; the new version, written to the bucket by the aggregator, is served by the second replica.
    stub = fleet.agg_stub()
    b = _assign(fleet, "b")
    for name, assignment in (("a", a), ("b", b)):
        received = download(fleet, fleet.devices[name], assignment)
        ack = upload_once(stub, assignment.ticket, 8, payload(scripted_delta(received, seed=1, assignment=assignment),
                                                             fleet.job.wire_dtype), metadata=fleet.devices[name].md)
        assert ack.accepted
    assert fleet.wait_round(stub, "job-r1").result_model_version == "job-v1"
    fleet.loop.run(first.server.stop(0.5))  # one replica gone
    a2 = _assign(fleet, "a")
    assert a2.model_version == "job-v1"
    got = MemorySink()
    download_once(fleet.ext_stub(second), a2.ticket, got, metadata=dev.md).reassembler.finish()
    reader = fleet.store.reader("job-v1")
    name = "classifier.weight"
    assert torch.equal(got.tensors[name], reader.read({name: None})[name].reshape(got.tensors[name].shape))

    assert [v.version for v in fleet.store.versions()] == ["job-v0", "job-v1"]
    # Versions live in the bucket only: on disk are the job's initial model and the aggregator's private server state
    # (its momentum buffer, which no other service reads).
    on_disk = [p for p in tmp_path.rglob("*.safetensors") if p.parent.name not in ("model", "server_state")]
    assert not on_disk and not list(tmp_path.rglob("index.json"))
