"""The extractor over real gRPC: plans, streamed slices, resume after a break, ticket checks, slice cache."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch

from edge_agent.client import aggregator_stub, extractor_stub
from edge_agent.transfer import SliceReceiver, download_once, download_request, upload_messages
from raffm.chunkwire import ChunkMessage
from raffm.fitting import RoundBudget, fit_inference
from raffm.planning import cost_model_for
from raffm.proto import recipe_from_proto, spec_from_proto
from raffm.reassembly import MemorySink
from raffm.strategy import STRATEGIES
from raffm.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2, extractor_pb2
from raffm.wire import START
from tests.integration.fedloop import (
    Fleet, budget_ladder, download, payload, plan_of, scripted_delta, spec_of, tiny_bert_folder, tiny_job,
)

RAFFM = STRATEGIES["raffm"]


@pytest.fixture()
def fleet(tmp_path: Path):
    job = tiny_job(tiny_bert_folder(tmp_path / "model"), clients_per_round=2, quorum=1, wire_dtype="bf16")
    f = Fleet(tmp_path, job).start()
    ladder_ = budget_ladder(job, f.store.info("job-v0").config)
    f.register("a", train_memory_mb=ladder_[0][0], tier="phone")  # the smallest rung
    f.register("b", train_memory_mb=64, tier="laptop")
    yield f
    f.stop()


def _assign(fleet: Fleet, name: str, timeout_s: float = 30):
    """The device's assignment, once a round is open for it."""
    end = time.monotonic() + timeout_s
    while (reply := fleet.poll(fleet.agg_stub(), fleet.devices[name])).WhichOneof("action") != "assignment":
        assert time.monotonic() < end, reply
        time.sleep(0.05)
    return reply.assignment


def test_slice_matches_the_global_model_and_resumes_after_a_break(fleet: Fleet) -> None:
    dev = fleet.devices["a"]
    a = _assign(fleet, "a")
    full = download(fleet, dev, a, chunk_bytes=1024)
    state = fleet.store.load("job-v0")
    plan = plan_of(fleet.store.info("job-v0").config, {n: tuple(t.shape) for n, t in state.items()}, spec_of(a))
    assert list(full) == list(plan)
    # The job's wire dtype, but the frozen vocabulary at the half precision the device stores it at.
    assert recipe_from_proto(a.recipe).frozen_dtype == "float16"
    for name, s in plan.items():
        dtype = torch.float16 if name == "bert.embeddings.word_embeddings.weight" else torch.bfloat16
        assert full[name].dtype == dtype and torch.equal(full[name], s.take(state[name]).to(dtype)), name

    # Break after 5 chunks, resume from the reassembler's point into the same sink.
    sink = MemorySink()
    first = download_once(fleet.ext_stub(), a.ticket, sink, metadata=dev.md, chunk_bytes=1024, max_chunks=5)
    point = first.reassembler.resume_point
    assert point != START and not first.reassembler.done
    second = download_once(fleet.ext_stub(), a.ticket, sink, metadata=dev.md, chunk_bytes=1024, resume=point)
    second.reassembler.finish()
    assert second.reassembler.bytes_received == first.manifest.total_bytes - first.reassembler.bytes_held
    assert a.predicted.wire_bytes == first.manifest.total_bytes  # the cost model prices what the extractor sends
    for name in full:
        assert torch.equal(sink.tensors[name], full[name]), name

    text = _metrics(fleet)
    assert "raffm_extractor_slice_cache_hits_total 2.0" in text
    assert "raffm_extractor_slice_cache_misses_total 1.0" in text
    assert 'raffm_extractor_download_bytes_total{tier="phone",wire_dtype="bfloat16"}' in text


def test_a_client_built_from_the_protos_alone_moves_the_same_bytes_as_the_agent(fleet: Fleet) -> None:
    """The agent's stubs read and write chunks without protobuf's copies (raffm.chunkwire); the generated stubs, all
    an independent client has, must receive the same slice and have their update accepted, and so must the agent's."""
    channel = grpc.insecure_channel(f"127.0.0.1:{fleet.extractor.server.port}")
    agg_channel = grpc.insecure_channel(f"127.0.0.1:{fleet.aggregator.server.port}")
    for name, generated in [("a", True), ("b", False)]:  # one round each (the job's quorum is one device)
        dev, a = fleet.devices[name], _assign(fleet, name)
        reference = download(fleet, dev, a, chunk_bytes=1024)  # generated stub: protobuf messages
        stream = list(extractor_stub(channel).DownloadSlice(download_request(a.ticket, chunk_bytes=1024),
                                                            metadata=dev.md, timeout=30))
        assert all(isinstance(m, ChunkMessage) for m in stream[1:]) and len(stream) > 2
        receiver = SliceReceiver(MemorySink())
        for msg in stream:
            receiver.receive(msg)
        receiver.reassembler.finish()
        assert list(receiver.sink.tensors) == list(reference)
        assert all(torch.equal(receiver.sink.tensors[n], t) for n, t in reference.items())

        messages = list(upload_messages(a.ticket, 5, payload(scripted_delta(reference, seed=1, assignment=a), "bf16"),
                                        chunk_bytes=1024))
        if generated:  # what a client written from the protos sends: protobuf messages, the generated stub
            messages = [aggregator_pb2.UploadMessage(chunk=common_pb2.TensorChunk(
                tensor=m.chunk.tensor, offset=m.chunk.offset, data=bytes(m.chunk.data)))
                if isinstance(m, ChunkMessage) else m for m in messages]
            stub = aggregator_pb2_grpc.AggregatorServiceStub(agg_channel)
        else:
            stub = aggregator_stub(agg_channel)
        assert stub.UploadUpdate(iter(messages), metadata=dev.md, timeout=30).accepted, name
        assert fleet.wait_round(fleet.agg_stub(), a.round_id).state == aggregator_pb2.ROUND_STATE_CLOSED


def test_tickets_are_checked(fleet: Fleet) -> None:
    a = _assign(fleet, "a")
    stub = fleet.ext_stub()
    with pytest.raises(grpc.RpcError) as err:  # another device's token
        download_once(stub, a.ticket, MemorySink(), metadata=fleet.devices["b"].md)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    forged = a.ticket[:-4] + (b"AAAA" if not a.ticket.endswith(b"AAAA") else b"BBBB")
    with pytest.raises(grpc.RpcError) as err:
        download_once(stub, forged, MemorySink(), metadata=fleet.devices["a"].md)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:  # no token at all
        download_once(stub, a.ticket, MemorySink())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _assert_reply_is_fit(reply: extractor_pb2.PlanReply, expected, *, infer: bool = False) -> None:
    """Every field of the Plan reply is the core strategy's (or fitter's) answer, unchanged."""
    c, t = expected.costs, expected.round_time
    assert spec_from_proto(reply.spec) == expected.spec
    assert recipe_from_proto(reply.recipe) == expected.recipe
    assert reply.cost.params == c.params and reply.cost.wire_bytes == c.wire_bytes
    assert reply.cost.upload_bytes == c.upload_bytes and reply.cost.trained_params == c.trained_params
    assert reply.cost.flops_per_sample == int(c.forward_flops_per_sample if infer else c.flops_per_sample)
    assert reply.cost.train_memory_mb == c.train_memory_mb and reply.cost.infer_memory_mb == c.infer_memory_mb
    assert (reply.cost.download_s, reply.cost.compute_s, reply.cost.upload_s) == (t.download_s, t.compute_s,
                                                                                  t.upload_s)
    assert reply.cost.est_seconds == t.total_s


def test_plan_rpc_returns_exactly_what_the_core_fitter_returns(fleet: Fleet) -> None:
    stub = fleet.ext_stub()
    md = fleet.devices["a"].md
    config = fleet.store.info("job-v0").config
    cm = cost_model_for(config)
    full_params = cm.params(spec_from_proto(stub.Plan(extractor_pb2.PlanRequest(
        profile=common_pb2.DeviceProfile(train_memory_mb=10_000, gflops=100, up_mbps=10, down_mbps=10),
        job=extractor_pb2.JobParams(batch_size=64, seq_len=32, deadline_s=100, local_steps=2)),
        metadata=md, timeout=30).full_spec))
    ladder_ = budget_ladder(fleet.job, config)
    cases = [(ladder_[-1][0] + 100, "fp32"), (ladder_[len(ladder_) // 2][0], "fp16"), (ladder_[0][0], "bf16")]
    enums = {"fp32": common_pb2.WIRE_DTYPE_FP32, "fp16": common_pb2.WIRE_DTYPE_FP16, "bf16": common_pb2.WIRE_DTYPE_BF16}
    seen = set()
    for memory, dtype in cases:
        reply = stub.Plan(extractor_pb2.PlanRequest(
            profile=common_pb2.DeviceProfile(train_memory_mb=memory, gflops=100, up_mbps=10, down_mbps=10,
                                             tier="laptop"),
            job=extractor_pb2.JobParams(batch_size=64, seq_len=32, deadline_s=100, local_steps=2,
                                        wire_dtype=enums[dtype], optimizer="adamw")), metadata=md, timeout=30)
        expected = RAFFM.plan(cm, RoundBudget(train_memory_mb=memory, gflops=100, up_mbps=10, down_mbps=10,
                                              deadline_s=100, batch_size=64, seq_len=32, local_steps=2), wire_dtype=dtype)
        _assert_reply_is_fit(reply, expected)
        assert reply.model_version == "job-v0"
        assert reply.param_fraction == expected.costs.params / full_params
        seen.add(reply.spec.SerializeToString())
    assert len(seen) == 3  # three budgets, three different sub-models
    # A tight deadline binds instead of memory: still exactly the fitter's answer.
    slow = dict(train_memory_mb=10_000, gflops=0.001, up_mbps=10, down_mbps=10)
    reply = stub.Plan(extractor_pb2.PlanRequest(profile=common_pb2.DeviceProfile(**slow), job=extractor_pb2.JobParams(
        batch_size=64, seq_len=32, deadline_s=300, local_steps=2)), metadata=md, timeout=30)
    expected = RAFFM.plan(cm, RoundBudget(**slow, deadline_s=300, batch_size=64, seq_len=32, local_steps=2))
    _assert_reply_is_fit(reply, expected)
    assert reply.param_fraction < 1
    # Another method, by name: full-model FedAvg trains every tensor of the whole model, or nothing.
    roomy = dict(train_memory_mb=10_000, gflops=100, up_mbps=10, down_mbps=10)
    reply = stub.Plan(extractor_pb2.PlanRequest(profile=common_pb2.DeviceProfile(**roomy), job=extractor_pb2.JobParams(
        batch_size=64, seq_len=32, deadline_s=300, local_steps=2), strategy="fedavg"), metadata=md, timeout=30)
    _assert_reply_is_fit(reply, STRATEGIES["fedavg"].plan(cm, RoundBudget(**roomy, deadline_s=300, batch_size=64,
                                                                          seq_len=32, local_steps=2)))
    assert reply.param_fraction == 1 and not reply.recipe.frozen_tensors
    with pytest.raises(grpc.RpcError) as err:
        stub.Plan(extractor_pb2.PlanRequest(profile=common_pb2.DeviceProfile(**roomy), strategy="best"),
                  metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown strategy 'best'" in err.value.details()

    # Inference plans use the separate inference budget (fit_inference).
    reply = stub.Plan(extractor_pb2.PlanRequest(
        profile=common_pb2.DeviceProfile(train_memory_mb=1, infer_memory_mb=9, gflops=1, up_mbps=1, down_mbps=1),
        job=extractor_pb2.JobParams(batch_size=4, seq_len=32), purpose=extractor_pb2.PLAN_PURPOSE_INFER),
        metadata=md, timeout=30)
    _assert_reply_is_fit(reply, fit_inference(cm, 9, batch_size=4, seq_len=32), infer=True)


def test_plan_rpc_refuses_profiles_nothing_fits(fleet: Fleet) -> None:
    stub = fleet.ext_stub()
    md = fleet.devices["a"].md
    job = extractor_pb2.JobParams(batch_size=64, seq_len=32, deadline_s=100, local_steps=2, optimizer="adamw")
    cm = cost_model_for(fleet.store.info("job-v0").config)
    with pytest.raises(grpc.RpcError) as err:
        stub.Plan(extractor_pb2.PlanRequest(profile=common_pb2.DeviceProfile(
            train_memory_mb=1, gflops=100, up_mbps=10, down_mbps=10), job=job), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ValueError) as core:
        RAFFM.plan(cm, RoundBudget(train_memory_mb=1, gflops=100, up_mbps=10, down_mbps=10, deadline_s=100,
                            batch_size=64, seq_len=32, local_steps=2))
    assert str(core.value) in err.value.details()  # the fitter's own message, not a paraphrase
    with pytest.raises(grpc.RpcError) as err:  # too slow for the deadline
        stub.Plan(extractor_pb2.PlanRequest(profile=common_pb2.DeviceProfile(
            train_memory_mb=1000, gflops=100, up_mbps=0.001, down_mbps=0.001), job=job), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "deadline_s" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # inference budget too small
        stub.Plan(extractor_pb2.PlanRequest(profile=common_pb2.DeviceProfile(
            train_memory_mb=1000, infer_memory_mb=1, gflops=100, up_mbps=10, down_mbps=10), job=job,
            purpose=extractor_pb2.PLAN_PURPOSE_INFER), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "infer_memory_mb" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # a malformed profile is the caller's error, not a misfit
        stub.Plan(extractor_pb2.PlanRequest(profile=common_pb2.DeviceProfile(
            train_memory_mb=1000, gflops=0, up_mbps=10, down_mbps=10), job=job), metadata=md, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "gflops" in err.value.details()
    text = _metrics(fleet)
    assert 'raffm_extractor_plans_total{outcome="no_fit"} 3.0' in text


def _metrics(fleet: Fleet) -> str:
    from prometheus_client import generate_latest

    return generate_latest(fleet.extractor.server.registry).decode()
