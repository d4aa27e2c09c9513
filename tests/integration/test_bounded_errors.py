"""Issue 12, item 3: an error quotes at most a short piece of what it rejects, so a 10 MB field gets the right status
(INVALID_ARGUMENT with a short message), never RESOURCE_EXHAUSTED from an oversized status in the trailers."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from edge_agent.transfer import upload_messages
from raffm.v1 import aggregator_pb2, common_pb2, registry_pb2
from services.registry.testing import ENROLL_KEY, make_profile
from tests.integration.fedloop import Fleet, download, payload, scripted_delta, tiny_bert_folder, tiny_job

HUGE = "x" * (10 << 20)
SHORT = 2000  # what a status message may take at most, with room to spare under the trailers' limit


def _rejected(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


def test_registration_with_a_10_mb_tier_or_name_is_invalid_argument_with_a_short_message(registry) -> None:
    for request in (
        registry_pb2.RegisterRequest(enroll_key=ENROLL_KEY, name="dev", profile=make_profile(tier=HUGE)),
        registry_pb2.RegisterRequest(enroll_key=ENROLL_KEY, name=HUGE, profile=make_profile()),
        registry_pb2.RegisterRequest(enroll_key=HUGE, name="dev", profile=make_profile()),
    ):
        err = _rejected(registry.stub.Register, request, timeout=30)
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED), err.details()[:300]
        assert len(err.details()) < SHORT
    err = _rejected(registry.stub.Register, registry_pb2.RegisterRequest(
        enroll_key=ENROLL_KEY, name="dev", profile=make_profile(tier=HUGE)), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "tier 'xxx" in err.details()
    assert "10485760 characters" in err.details()
    ok = registry.register("dev")  # nothing was half-written: the name is still free
    assert ok.device_id


@pytest.fixture()
def fleet(tmp_path: Path):
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=1, quorum=1, rounds=1)
    f = Fleet(tmp_path, job).start()
    f.register("a", train_memory_mb=64, tier="laptop")
    yield f
    f.stop()


def test_an_upload_naming_a_10_mb_tensor_is_invalid_argument_with_a_short_message(fleet: Fleet) -> None:
    stub, dev = fleet.agg_stub(), fleet.devices["a"]
    a = fleet.poll(stub, dev).assignment
    pl = payload(scripted_delta(download(fleet, dev, a), seed=1, assignment=a), "fp32")
    msgs = list(upload_messages(a.ticket, 5, pl, chunk_bytes=1 << 16))
    header, manifest = msgs[0], msgs[1]

    # A chunk for a tensor whose name is 10 MB long.
    chunk = aggregator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(tensor=HUGE, offset=0, data=b"x"))
    err = _rejected(stub.UploadUpdate, iter([header, manifest, chunk]), metadata=dev.md, timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()[:300]
    assert "not in the manifest" in err.details() and len(err.details()) < SHORT

    # A manifest that names a 10 MB tensor.
    bad = aggregator_pb2.UploadMessage()
    bad.CopyFrom(manifest)
    bad.manifest.tensors[0].name = HUGE
    err = _rejected(stub.UploadUpdate, iter([header, bad]), metadata=dev.md, timeout=60)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()[:300]
    assert len(err.details()) < SHORT

    # The good upload still goes through: nothing of the bad ones was kept.
    ack = stub.UploadUpdate(iter(msgs), metadata=dev.md, timeout=60)
    assert ack.bytes_received == pl.nbytes
