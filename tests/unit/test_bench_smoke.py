"""Smoke test of bench/bench_fl.py at a tiny size: a random-init tiny BERT, 4 clients (one per tier), 1 round.

Checks the structure and the accounting of the result, not accuracy (a random tiny model learns nothing in a round).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from raffm.costs import CostModel
from raffm.data import TextDataset
from raffm.spec import ElasticSpec

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_fl.py"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_fl_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class WordHashTokenizer:
    """Enough of an HF tokenizer for ``raffm.training.batches``: words hashed into a small vocabulary."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, texts: list[str], *, max_length: int, **_: Any) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            words = [1] + [2 + sum(map(ord, w)) % (self.vocab - 2) for w in text.split()][: max_length - 1]
            ids[i, : len(words)] = torch.tensor(words)
            mask[i, : len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(config).eval()


def toy_data(n: int = 160) -> TextDataset:
    good, bad = ["great fun", "lovely warm film", "a joy"], ["dull mess", "boring and long", "a chore"]
    texts = [(good if i % 2 else bad)[i % 3] + f" take {i % 7}" for i in range(n)]
    return TextDataset(texts, [i % 2 for i in range(n)], ("rotten", "fresh"))


@pytest.fixture(scope="module")
def bench() -> Any:
    return _load_bench()


@pytest.fixture(scope="module")
def result(bench: Any) -> dict[str, Any]:
    settings = bench.Settings(clients=4, rounds=1, seeds=(0,), local_steps=1, batch_size=8, seq_len=16, test_size=40,
                              max_train=0, fractions=(0.5, 1.0), threads=1)
    return bench.run_bench(settings, tiny_model, toy_data(), WordHashTokenizer(64), log=lambda _: None)


def test_every_method_runs_every_seed_and_round(bench: Any, result: dict[str, Any]) -> None:
    runs = result["runs"]
    assert sorted(r["method"] for r in runs) == sorted(bench.METHODS)
    for run in runs:
        assert len(run["accuracy"]) == len(run["bytes_down"]) == len(run["bytes_up"]) == 1
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"] + [run["initial_accuracy"]])
        assert run["total_bytes"] == sum(run["bytes_down"]) + sum(run["bytes_up"]) > 0
    json.dumps(result)  # the JSON the bench writes


def test_fleet_is_heterogeneous_with_one_full_model_client(result: dict[str, Any]) -> None:
    fleet = result["fleets"]["0"]
    assert [c["tier"] for c in fleet] == ["sbc", "phone", "jetson", "server"]
    assert [c["full_model"] for c in fleet] == [False, False, False, True]
    params = [c["params"] for c in fleet]
    assert params == sorted(params) and params[0] < params[-1]
    assert sum(c["examples"] for c in fleet) == 160 - 40


def test_bytes_follow_the_specs(result: dict[str, Any]) -> None:
    full = CostModel.from_model(tiny_model(0))
    full_bytes = 4 * full.params(ElasticSpec.full(full.dims))
    fleet = result["fleets"]["0"]
    by_method = {r["method"]: r for r in result["runs"]}
    assert by_method["fedavg_all"]["bytes_down"] == [4 * full_bytes]
    assert by_method["fedavg_capable"]["bytes_down"] == [full_bytes]
    assert by_method["fedavg_capable"]["participants"] == [1]
    sliced = 4 * sum(c["params"] for c in fleet)
    for method in ("raffm", "raffm_paper", "heterofl"):
        assert by_method[method]["bytes_down"] == by_method[method]["bytes_up"] == [sliced]
    ratio = result["summary"]["raffm"]["bytes_vs_fedavg_all"]
    assert ratio == pytest.approx(sliced / (4 * full_bytes)) and ratio < 1


def test_summary_and_scaling_structure(bench: Any, result: dict[str, Any]) -> None:
    summary = result["summary"]
    assert set(summary) == set(bench.METHODS)
    for method in bench.SCALING_METHODS:
        points = summary[method]["scaling"]
        assert [p["target_fraction"] for p in points] == [0.5, 1.0]
        assert points[-1]["param_fraction"] == pytest.approx(1.0)
        assert 0 < points[0]["param_fraction"] <= 0.5
    assert "scaling" not in summary["heterofl"]
    text = bench.render(result)
    assert "| raffm |" in text and "Inference scaling" in text


def test_full_fedavg_of_one_client_with_zero_lr_keeps_the_model(bench: Any) -> None:
    """The loop really aggregates: with a negligible lr the global model after a round equals the initial one."""
    settings = bench.Settings(clients=1, rounds=1, seeds=(0,), local_steps=1, batch_size=8, seq_len=16, lr=1e-30,
                              test_size=40, max_train=0, methods=("fedavg_all",), scaling_methods=())
    data = toy_data()
    initial = tiny_model(0)
    fleet = bench.build_fleet(initial, data.subset(range(40, 160)), settings, 0)
    run, final = bench.run_method("fedavg_all", initial, fleet, data.subset(range(40)), WordHashTokenizer(64),
                                  settings, 0, log=lambda _: None)
    for name, tensor in initial.state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], tensor, rtol=0, atol=1e-6)
    assert run.accuracy[0] == run.initial_accuracy
