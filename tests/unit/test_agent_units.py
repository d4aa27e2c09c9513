"""Unit tests of the edge agent's pure parts: configuration precedence, the atomic state file, backoff, fault
injection, tier spreading, and building a sub-model from downloaded tensors."""

from __future__ import annotations

import json
import os
import random
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.client import Backoff, FaultInjector, InjectedFault, Stopped, Stopper
from edge_agent.config import AgentConfig, resolve
from edge_agent.simulate import Tier, load_tiers, spread
from edge_agent.state import STATE_FILE, AgentState, StateLock, clean_temporaries, load_state, save_state
from raffm.v1 import common_pb2, extractor_pb2

MANUAL = dict(memory_mb=900, gflops=10.0, up_mbps=5.0, down_mbps=20.0)


# ------------------------------------------------------------------------------------------------------ config


def test_flags_override_environment_override_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('[agent]\nmemory_mb = 100\ngflops = 1.5\nup-mbps = 2\ndown_mbps = 3\nname = "from-file"\n')
    env = {"RAFFM_AGENT_MEMORY_MB": "200", "RAFFM_AGENT_NAME": "from-env"}
    cfg = resolve({"memory_mb": 300, "name": None}, config_file=str(f), environ=env)
    assert (cfg.memory_mb, cfg.name, cfg.gflops, cfg.up_mbps) == (300, "from-env", 1.5, 2.0)
    assert resolve({}, config_file=str(f), environ=env).memory_mb == 200
    assert resolve({}, config_file=str(f), environ={}).memory_mb == 100


@pytest.mark.parametrize("bad, message", [
    ({"memory_mb": 0}, "--memory-mb"),
    ({"registry": "nohost"}, "--registry"),
    ({"tier": "toaster"}, "--tier"),
    ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "--tls-cert"),
    ({"tls_cert": "x"}, "together"),
    ({"backoff_initial_s": 5.0, "backoff_max_s": 1.0}, "--backoff-max-s"),
])
def test_bad_settings_name_the_flag(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve({**MANUAL, **bad}, environ={})


def test_unknown_config_file_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "agent.yaml"
    f.write_text("memory_mbb: 5\n")
    with pytest.raises(ValueError, match="unknown setting 'memory_mbb'"):
        resolve(MANUAL, config_file=str(f), environ={})


def test_public_dict_masks_the_enrollment_key() -> None:
    assert AgentConfig(enroll_key="secret", **MANUAL).public_dict()["enroll_key"] == "***"


# ------------------------------------------------------------------------------------------------------ state


def test_state_round_trip_is_private_and_atomic(tmp_path: Path) -> None:
    state = AgentState(device_id="d1", token="rfm_x", name="pi", history=("r1:uploaded",))
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    assert stat.S_IMODE(os.stat(tmp_path / STATE_FILE).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]


def test_a_killed_writer_leaves_the_old_state_and_a_removable_temporary(tmp_path: Path) -> None:
    save_state(tmp_path, AgentState(device_id="old", token="t"))
    (tmp_path / ".agent-state-123.tmp").write_text('{"device_id": "ha')  # what a crash mid-write leaves
    assert load_state(tmp_path).device_id == "old"
    assert clean_temporaries(tmp_path) == 1 and not list(tmp_path.glob(".agent-state-*"))


def test_write_failure_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_state(tmp_path, AgentState(device_id="old", token="t"))

    def boom(*_a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_state(tmp_path, AgentState(device_id="new", token="t"))
    assert load_state(tmp_path).device_id == "old" and not list(tmp_path.glob(".agent-state-*"))


def test_corrupt_state_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="move it away"):
        load_state(tmp_path)
    assert load_state(tmp_path / "missing") == AgentState()


def test_two_agents_cannot_share_a_state_directory(tmp_path: Path) -> None:
    with StateLock(tmp_path):
        with pytest.raises(ValueError, match="another agent"):
            StateLock(tmp_path).acquire()
    with StateLock(tmp_path):  # released
        pass


# ------------------------------------------------------------------------------------------------------ backoff


@given(st.floats(0.01, 5), st.floats(1, 100), st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_backoff_grows_with_jitter_and_is_capped(initial: float, factor: float, seed: int) -> None:
    maximum = initial * factor
    b = Backoff(initial, maximum, rng=random.Random(seed))
    for n in range(30):
        ceiling = min(maximum, initial * 2**n)
        assert ceiling / 2 <= b.next_delay() <= ceiling
    b.reset()
    assert b.next_delay() <= initial


def test_stopper_wait_raises_once_stopped_and_runs_cancel_callbacks() -> None:
    s = Stopper()
    s.start_watcher()
    cancelled: list[str] = []
    s.on_stop(lambda: cancelled.append("call"))
    s.wait(0)
    s.stop("SIGTERM")
    with pytest.raises(Stopped):
        s.wait(10)
    for _ in range(100):
        if cancelled:
            break
        time.sleep(0.01)
    assert cancelled == ["call"] and s.reason == "SIGTERM"


@pytest.mark.timeout(60)
def test_stopper_stop_takes_no_lock_so_a_second_signal_cannot_deadlock_the_first() -> None:
    """A second SIGTERM (the demo signals the fleet's process group, and `raffm agent simulate` forwards the signal
    too) runs its handler inside the first one's. ``Event.set`` holds a non-reentrant lock, so a handler calling it
    while interrupted code holds that lock hung the agent for good."""
    s = Stopper()
    s.start_watcher()
    with s.event._cond:  # type: ignore[attr-defined]  # what the interrupted Event.set() was holding
        s.stop("SIGTERM")
        s.stop("SIGTERM")  # the second signal
        with pytest.raises(Stopped):
            s.check()
    with pytest.raises(Stopped):
        s.wait(30)
    assert s.event.wait(30) and s.reason == "SIGTERM"


@pytest.mark.timeout(60)
def test_stoppers_share_one_sleeping_watcher_and_a_stop_wakes_only_its_own_agent() -> None:
    """A simulator runs hundreds of agents in one process: their stoppers share one watcher thread (a thread each,
    polling its flag, kept the idle fleet's process busy), and a stop still wakes that agent's sleepers and cancels
    its calls, and no other agent's."""
    before = threading.active_count()
    stoppers = [Stopper() for _ in range(50)]
    cancelled: list[int] = []
    for i, s in enumerate(stoppers):
        s.start_watcher()
        s.on_stop(lambda i=i: cancelled.append(i))  # type: ignore[misc]
    assert threading.active_count() <= before + 1
    stoppers[7].stop("SIGTERM")  # on the main thread, as a signal handler would: only the watcher sets the event
    assert stoppers[7].event.wait(10)
    deadline = time.monotonic() + 10
    while not cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cancelled == [7]
    assert not any(s.event.is_set() or s.stopped for i, s in enumerate(stoppers) if i != 7)
    for s in stoppers:
        s.close()


# ------------------------------------------------------------------------------------------------------ faults


def _stream(n: int) -> list[extractor_pb2.SliceMessage]:
    msgs = [extractor_pb2.SliceMessage(manifest=common_pb2.Manifest())]
    msgs += [extractor_pb2.SliceMessage(chunk=common_pb2.TensorChunk(tensor="w", offset=i * 4, data=b"abcd"))
             for i in range(n)]
    return msgs


def test_fault_injector_breaks_and_corrupts_exactly_once() -> None:
    f = FaultInjector(break_download_after=2, corrupt_download_chunk=1)
    cancelled: list[bool] = []
    got = []
    with pytest.raises(InjectedFault):
        for m in f.wrap_download(iter(_stream(5)), lambda: cancelled.append(True)):
            got.append(m)
    assert len(got) == 3 and got[2].chunk.data != b"abcd" and cancelled == [True]
    assert len(list(f.wrap_download(iter(_stream(5)), lambda: None))) == 6  # fired once only


# ------------------------------------------------------------------------------------------------------ simulate


def test_spread_follows_shares_and_mixes_tiers() -> None:
    a, b = Tier("phone", 600, 5, 5, 20, share=2), Tier("laptop", 1500, 50, 50, 200, share=1)
    out = spread([a, b], 7)
    assert [t.name for t in out].count("phone") == 5 and len(out) == 7
    assert {t.name for t in out[:2]} == {"phone", "laptop"}


def test_tiers_file_is_validated(tmp_path: Path) -> None:
    f = tmp_path / "tiers.toml"
    f.write_text("[tiers.phone]\nmemory_mb = 600\ngflops = 5\nup_mbps = 5\n")
    with pytest.raises(ValueError, match="lacks down_mbps"):
        load_tiers(f)
    f.write_text("[tiers.phone]\nmemory_mb = 600\ngflops = 5\nup_mbps = 5\ndown_mbps = 20\n")
    assert load_tiers(f) == [Tier("phone", 600, 5.0, 5.0, 20.0, 1.0, "phone")]


# ------------------------------------------------------------------------------------------------------ sub-model


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-2)])
def test_submodel_built_from_tensors_matches_extraction(dtype: torch.dtype, tol: float) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from edge_agent.submodel import build_submodel, global_config
    from raffm.elastic import extract
    from raffm.spec import ElasticSpec

    torch.manual_seed(0)
    g = BertForSequenceClassification(BertConfig(vocab_size=100, num_labels=3, hidden_size=48, num_hidden_layers=3,
                                                 num_attention_heads=4, intermediate_size=96)).eval()
    spec = ElasticSpec.from_dict({"hidden": 32, "layers": [{"heads": 2, "head_dim": 8, "ffn": 40}] * 2})
    ref = extract(g, spec).eval()
    tensors = {n: p.detach().clone().to(dtype) for n, p in ref.named_parameters()}
    config = global_config(common_pb2.Manifest(model_config_json=g.config.to_json_string()),
                           fallback_model="unused", num_labels=3)
    sub = build_submodel(config, spec, tensors).eval()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=ids).logits, sub(input_ids=ids).logits, atol=tol)
    assert all(p.dtype == torch.float32 for p in sub.parameters())
    tensors.pop(next(iter(tensors)))
    with pytest.raises(ValueError, match="missing"):
        build_submodel(config, spec, tensors)


def test_predicted_memory_grows_with_fedprox_and_with_the_spec() -> None:
    from transformers import BertConfig

    from edge_agent.trainer import predict_memory
    from raffm.spec import ElasticSpec, ModelDims

    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=2)
    dims = ModelDims(hidden=64, layers=2, heads=4, head_dim=16, ffn=128)
    small = ElasticSpec.uniform(dims, heads=1, ffn=32)
    full = ElasticSpec.full(dims)
    p_small = predict_memory(config, small, batch_size=4, seq_len=16, fedprox=False, image=False)
    p_full = predict_memory(config, full, batch_size=4, seq_len=16, fedprox=False, image=False)
    p_prox = predict_memory(config, full, batch_size=4, seq_len=16, fedprox=True, image=False)
    assert p_small.total_mb < p_full.total_mb < p_prox.total_mb
    assert p_full.extra_mb == 0 and p_prox.extra_mb > 0


def test_json_logs_carry_event_fields() -> None:
    import io
    import logging

    from edge_agent.progress import setup_logging

    buf = io.StringIO()
    setup_logging("json", "info", stream=buf)
    logging.getLogger("edge_agent.test").info("hello %s", "x", extra={"event": "wait", "seconds": 1.5})
    line = json.loads(buf.getvalue().strip())
    assert line["msg"] == "hello x" and line["event"] == "wait" and line["seconds"] == 1.5 and line["level"] == "info"


# ------------------------------------------------------------- simulate: prompt -> response pairs (issue 15)


def test_simulate_splits_and_writes_prompt_response_pairs(tmp_path: Path) -> None:
    from edge_agent.localdata import load_local_data
    from edge_agent.simulate import sniff_task, split_data, split_keys, write_share
    from raffm.generative import InstructionDataset

    rng = random.Random(0)
    answers = [rng.choice([" positive", " negative"]) for _ in range(200)]
    data = InstructionDataset([f"Review: {i}\nSentiment:" for i in range(200)], answers)
    # Few distinct answers: they are the labels the Dirichlet split skews; open-ended answers: one key.
    assert set(split_keys(data)) == {0, 1}
    assert set(split_keys(InstructionDataset([str(i) for i in range(100)], [f"a{i}" for i in range(100)]))) == {0}
    shares = split_data(data, 4, alpha=0.1, seed=0)
    assert sorted(p for s in shares for p in s.prompts) == sorted(data.prompts)
    skews = [sum(r == " positive" for r in s.responses) / len(s) for s in shares]
    assert max(skews) - min(skews) > 0.3  # alpha 0.1: very different answer mixes
    path = write_share(shares[0], tmp_path / "share")
    assert path.suffix == ".jsonl" and sniff_task(str(path)) == "causal-lm"
    again = load_local_data(str(path), task="causal-lm")
    assert (again.prompts, again.responses) == (shares[0].prompts, shares[0].responses)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "fine", "label": 1}) + "\n")
    assert sniff_task(str(text)) == "sequence-classification" and sniff_task("rotten_tomatoes") == \
        "sequence-classification"


# ------------------------------------------------------------------------------------------------------ tensor cache


def test_cached_tensors_are_read_in_pieces_and_a_damaged_file_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edge_agent import transfer
    from edge_agent.cache import TensorCache
    from raffm.proto import manifest_to_proto
    from raffm.reassembly import MemorySink
    from raffm.wire import ChecksumError, WirePayload

    payload = WirePayload.from_state({"vocab": torch.randn(64, 32), "bias": torch.randn(5)}, "float32")
    cache = TensorCache(tmp_path / "cache")
    for meta in payload.manifest.tensors:
        cache.put(meta.sha256, payload.source(meta))
    monkeypatch.setattr(transfer, "CACHE_PIECE_BYTES", 1000)  # the 8 KiB table arrives in 9 pieces
    written: list[int] = []
    sink = MemorySink()
    original = sink.write
    monkeypatch.setattr(sink, "write",
                        lambda meta, offset, data: (written.append(len(data)), original(meta, offset, data)))
    receiver = transfer.SliceReceiver(sink, cache=cache)
    receiver.receive(extractor_pb2.SliceMessage(manifest=manifest_to_proto(payload.manifest)))
    assert receiver.reassembler.done and receiver.cached_bytes == payload.nbytes
    assert max(written) == 1000 and len(written) == 9 + 1
    for name, tensor in payload.tensors.items():
        assert torch.equal(sink.tensors[name], tensor)

    vocab = payload.manifest.tensors[0]
    (cache.dir / vocab.sha256.hex()).write_bytes(b"\0" * vocab.nbytes)  # damaged on disk
    with pytest.raises(ChecksumError):
        transfer.SliceReceiver(MemorySink(), cache=cache).receive(
            extractor_pb2.SliceMessage(manifest=manifest_to_proto(payload.manifest)))
    assert vocab.sha256 not in cache.digests()  # the next download fetches it from the extractor


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "camembert", "distilbert", "opt-classifier",
                                  "gpt2-classifier", "neox-classifier", "modernbert",
                                  "modernbert-cls"])
def test_a_device_builds_the_slice_of_every_encoder_family_from_the_manifest_alone(kind: str) -> None:
    """What a device receives (the global config as JSON, the slice's tensors) rebuilds the extracted sub-model, with
    the buffers each family keeps out of the download (position ids, token types)."""
    from edge_agent.submodel import build_submodel, global_config
    from raffm.arch import adapter_for
    from raffm.elastic import extract
    from raffm.spec import ElasticSpec, LayerSpec
    from raffm.spp import prioritize
    from tests.unit.models_fixtures import inputs, make, output

    model = prioritize(make(kind))
    dims = adapter_for(model).dims(model.config)
    spec = ElasticSpec(hidden=dims.hidden, layers=(LayerSpec(3, dims.head_dim, 50),) * dims.layers)
    ref = extract(model, spec).eval()
    config = global_config(common_pb2.Manifest(model_config_json=model.config.to_json_string()),
                           fallback_model="unused", num_labels=3)
    sub = build_submodel(config, spec, {n: p.detach().clone() for n, p in ref.named_parameters()}).eval()
    batch = inputs(kind)
    assert torch.equal(output(sub, batch), output(ref, batch))
