"""The streamed safetensors format: what we write is what the safetensors library reads, and reading leading prefixes
(coalesced, in parallel) returns exactly the leading elements; a slice cut from prefixes equals one cut from the
whole tensor, for every spec a sub-model can have."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from raffm.checkpoints import FileCheckpointStore, MemoryCheckpointStore, file_range_reader, write_safetensors
from raffm.planning import adapter_and_dims
from raffm.slicing import slice_plan
from raffm.spec import ElasticSpec, LayerSpec
from raffm.stformat import FormatError, SafetensorsReader, serialize


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(7, 5, generator=g), "b": torch.arange(10, dtype=torch.int64),
            "c": torch.randn(3, 4, 2, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 3),
            "flag": torch.tensor([True, False, True])}


def test_written_file_is_safetensors_and_its_digest_is_the_files(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "x.safetensors"
    digest = write_safetensors(path, state, {"k": "v"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == serialize(state, {"k": "v"}).sha256()
    assert serialize(state, {"k": "v"}).nbytes == path.stat().st_size
    got = load_file(str(path))
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("gap,workers", [(0, 1), (1 << 20, 1), (0, 4), (1 << 20, 4)])
def test_prefix_reads_return_the_leading_elements(tmp_path: Path, gap: int, workers: int) -> None:
    state = _state()
    path = tmp_path / "x.safetensors"
    write_safetensors(path, state)
    calls: list[tuple[int, int]] = []
    inner = file_range_reader(path)

    def counting(start: int, out: memoryview) -> None:
        calls.append((start, len(out)))
        inner(start, out)

    reader = SafetensorsReader(counting, gap_bytes=gap, workers=workers)
    calls.clear()
    got = reader.read({"a": 12, "b": None, "c": 5, "empty": None, "flag": 2})
    assert torch.equal(got["a"], state["a"].reshape(-1)[:12])
    assert torch.equal(got["b"], state["b"]) and torch.equal(got["c"], state["c"].reshape(-1)[:5])
    assert got["empty"].numel() == 0 and got["flag"].tolist() == [True, False]
    asked = 12 * 4 + 10 * 8 + 5 * 2 + 2
    if gap:
        assert len(calls) == 1  # neighbours coalesced into one ranged read
    else:
        assert sum(n for _, n in calls) == asked  # only the bytes asked for (adjacent ones in one read)
    with pytest.raises(KeyError):
        reader.read({"nope": None})
    with pytest.raises(ValueError):
        reader.read({"a": 36})


def test_a_damaged_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((8).to_bytes(8, "little") + b"not json")
    with pytest.raises(FormatError):
        SafetensorsReader(file_range_reader(path))


def _bert_state() -> tuple[dict, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                     max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg)
    return cfg.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("spec", [
    ElasticSpec(hidden=24, layers=(LayerSpec(4, 6, 40),) * 3),
    ElasticSpec(hidden=24, layers=(LayerSpec(2, 6, 20), LayerSpec(1, 6, 10))),
    ElasticSpec(hidden=16, layers=(LayerSpec(3, 4, 17),) * 3),
    ElasticSpec(hidden=8, layers=(LayerSpec(1, 2, 1),)),
], ids=["full", "heads-ffn-depth", "hidden-headdim", "smallest"])
def test_a_slice_from_stored_prefixes_equals_the_slice_of_the_whole_tensors(tmp_path: Path,
                                                                           spec: ElasticSpec) -> None:
    config, state = _bert_state()
    adapter, dims = adapter_and_dims(config)
    plan = slice_plan(adapter, dims, spec, {n: tuple(t.shape) for n, t in state.items()})
    for store in (FileCheckpointStore(tmp_path / "ckpt"), MemoryCheckpointStore()):
        store.put("v0", state, config)
        reader = store.reader("v0")
        prefixes = reader.read({n: s.prefix_numel for n, s in plan.items()})
        total = sum(t.numel() for t in state.values())
        read = sum(p.numel() for p in prefixes.values())
        for name, s in plan.items():
            assert torch.equal(s.take_prefix(prefixes[name]), s.take(state[name])), name
        if spec != ElasticSpec.full(dims):
            assert read < total  # dropped layers and unkept tails are never read
