"""A 2.5 GB synthetic model streams down (extractor) and up (aggregator) over real gRPC, tensor by tensor.

Memory stays bounded: the device side verifies the download without keeping it and uploads zeros generated per
tensor; the aggregator stages to disk and validates/folds memory-mapped tensors.
"""

from __future__ import annotations

import hashlib
import resource
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig

from edge_agent.transfer import download_once, upload_once
from raffm.reassembly import HashOnlySink
from raffm.v1 import aggregator_pb2
from raffm.wire import Manifest, TensorMeta
from tests.integration.fedloop import Fleet, tiny_job

BIG = dict(vocab_size=30522, hidden_size=1536, num_hidden_layers=21, num_attention_heads=16, intermediate_size=6144,
           max_position_embeddings=512, num_labels=2)


def _big_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from raffm.planning import cost_model_for

    config = BertConfig(**BIG).to_dict()
    config["model_type"] = "bert"
    shapes = cost_model_for(config).shapes
    g = torch.Generator().manual_seed(0)
    return {n: torch.empty(s).uniform_(-0.05, 0.05, generator=g) for n, s in shapes.items()}, config


class ZeroDelta:
    """An upload payload of zeros, produced one tensor at a time (never the whole model in memory)."""

    def __init__(self, manifest: Manifest) -> None:
        metas = []
        for m in manifest.tensors:
            digest = hashlib.sha256()
            block = bytes(min(m.nbytes, 64 << 20))
            left = m.nbytes
            while left:
                digest.update(memoryview(block)[: min(left, len(block))])
                left -= min(left, len(block))
            metas.append(TensorMeta(m.name, m.dtype, m.shape, m.nbytes, digest.digest()))
        self.manifest = Manifest(tuple(metas))
        self.nbytes = self.manifest.total_bytes

    def source(self, meta: TensorMeta) -> bytes:
        return bytes(meta.nbytes)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_2_5_gb_model_streams_down_and_up(tmp_path: Path) -> None:
    job = tiny_job(tmp_path / "unused", num_labels=2, rounds=1, clients_per_round=2, quorum=2,
                   strategy="fedavg", ordering="never", accum_dtype="float32", wire_dtype="fp32")
    fleet = Fleet(tmp_path, job, initial_model=_big_state).start()
    try:
        dev = fleet.register("server", train_memory_mb=1 << 20, gflops=1e5, up_mbps=1e5, down_mbps=1e5, tier="server")
        stub = fleet.agg_stub()
        a = fleet.poll(stub, dev).assignment
        assert a.predicted.params > 600_000_000  # the full model fits this device

        t0 = time.perf_counter()
        sink = HashOnlySink()
        d = download_once(fleet.ext_stub(), a.ticket, sink, metadata=dev.md, timeout=600)
        d.reassembler.finish()  # every tensor's sha256 verified
        down_s = time.perf_counter() - t0
        total = d.manifest.total_bytes
        assert total > 2_500_000_000 and len(sink.completed) == len(d.manifest)

        t0 = time.perf_counter()
        delta = ZeroDelta(d.manifest)
        ack = upload_once(stub, a.ticket, 1, delta, metadata=dev.md, timeout=600)  # type: ignore[arg-type]
        up_s = time.perf_counter() - t0
        assert ack.accepted and ack.bytes_received == total
        rnd = stub.GetRound(aggregator_pb2.GetRoundRequest(round_id=a.round_id), metadata=fleet.operator, timeout=10)
        assert rnd.accepted == 1 and rnd.bytes_up == total
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
        print(f"\n2.5 GB transfer: {total / 1e9:.2f} GB down {total / down_s / 1e6:.0f} MB/s, "
              f"up {total / up_s / 1e6:.0f} MB/s, peak RSS {peak_gib:.1f} GiB")
        assert peak_gib < 16, "the transfer must stream, not hold several copies of the model"
    finally:
        fleet.stop()
