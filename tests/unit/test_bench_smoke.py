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

from raffm.costs import CostModel
from raffm.spec import ElasticSpec
from tests.unit.toys import WordHashTokenizer, tiny_model, toy_data

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_fl.py"


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_fl_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> Any:
    return _load_bench()


@pytest.fixture(scope="module")
def result(bench: Any) -> dict[str, Any]:
    settings = bench.Settings(clients=4, rounds=1, seeds=(0,), local_steps=1, batch_size=8, seq_len=16, test_size=40,
                              max_train=80, distill_pool=20, holdout=20, fractions=(0.5, 1.0), threads=1)
    return bench.run_bench(settings, tiny_model, toy_data(), WordHashTokenizer(64), log=lambda _: None)


def test_every_method_runs_every_seed_and_round(bench: Any, result: dict[str, Any]) -> None:
    runs = result["runs"]
    assert sorted(r["method"] for r in runs) == sorted(bench.METHODS)
    for run in runs:
        assert len(run["accuracy"]) == len(run["bytes_down"]) == len(run["bytes_up"]) == 1
        assert all(0.0 <= a <= 1.0 for a in run["accuracy"] + [run["initial_accuracy"]])
        moved = sum(run["bytes_down"]) + sum(run["bytes_up"])
        assert run["total_bytes"] == moved and (moved == 0) == (run["method"] == "central")
        # served at the label shares its clients trained on, fitted on the unlabelled pool (as `raffm demo` does)
        assert len(run["label_counts"]) == 2 and sum(run["label_counts"]) > 0 and 0.0 <= run["served_accuracy"] <= 1.0
    assert all(e["served_accuracy"]["n"] == 1 for e in result["summary"].values())
    json.dumps(result)  # the JSON the bench writes


def test_the_central_reference_is_one_full_model_device_that_moves_no_bytes(result: dict[str, Any]) -> None:
    """`central` is one device (it holds every client's data) training the whole model, with no network."""
    by_method = {r["method"]: r for r in result["runs"]}
    central = by_method["central"]
    assert central["participants"] == [1] and central["specs"] == by_method["fedavg_all"]["specs"][:1]
    assert central["params"] == by_method["fedavg_all"]["params"][:1]
    assert result["summary"]["central"]["gain_per_gb"] is None and result["summary"]["central"]["bytes_vs_fedavg_all"] == 0


def test_fleet_is_heterogeneous_and_the_small_tiers_train_slices(result: dict[str, Any]) -> None:
    fleet = result["fleets"]["0"]
    assert [c["tier"] for c in fleet] == ["sbc", "phone", "jetson", "server"]
    assert [c["full_model"] for c in fleet[:2]] == [False, False] and fleet[-1]["full_model"]
    params = [c["params"] for c in fleet]
    assert params == sorted(params) and params[0] < params[-1]
    assert sum(c["examples"] for c in fleet) == 80  # max_train; the test, holdout and pool reviews are never trained
    for c in fleet:  # the fidelity of each slice to the full model at version 0
        assert 0.0 <= c["prediction_agreement"] <= 1.0 and -1.0 <= c["hidden_cosine"] <= 1.0 + 1e-6
    assert fleet[-1]["hidden_cosine"] == pytest.approx(1.0) and fleet[-1]["prediction_agreement"] == 1.0


def test_bytes_follow_the_specs_and_the_recipe(result: dict[str, Any]) -> None:
    full = CostModel.from_model(tiny_model(0))
    full_bytes = 4 * full.params(ElasticSpec.full(full.dims))
    by_method = {r["method"]: r for r in result["runs"]}
    assert by_method["fedavg_all"]["bytes_down"] == by_method["fedavg_all"]["bytes_up"] == [4 * full_bytes]
    assert by_method["fedavg_capable"]["bytes_down"] == [full_bytes]
    assert by_method["fedavg_capable"]["participants"] == [1]
    specs = {r["method"]: r["specs"] for r in result["runs"]}
    assert specs["fedavg_capable"] == ["-", "-", "-", specs["fedavg_all"][0]]
    for method in ("raffm_paper", "heterofl"):  # every tensor trained: the delta is as big as the slice
        sliced = 4 * sum(by_method[method]["params"])
        assert by_method[method]["bytes_down"] == by_method[method]["bytes_up"] == [sliced]
    # raffm freezes the input embeddings and the first layer: downloaded (once) but never uploaded
    fleet = result["fleets"]["0"]
    above = sum(p.numel() for n, p in tiny_model(0).named_parameters() if ".embeddings." not in n and ".layer.0." not in n)
    assert fleet[-1]["full_model"] and fleet[-1]["trained_params"] == above
    sliced, trained = 4 * sum(by_method["raffm"]["params"]), 4 * sum(c["trained_params"] for c in fleet)
    # the frozen vocabulary comes down at half precision, as the devices store it
    vocab = sum(p.numel() for n, p in tiny_model(0).named_parameters() if "word_embeddings" in n)
    devices = sum(s != "-" for s in specs["raffm"])
    assert by_method["raffm"]["bytes_down"] == [sliced - 2 * vocab * devices]
    assert by_method["raffm"]["bytes_up"] == [trained]
    ratio = result["summary"]["raffm"]["bytes_vs_fedavg_all"]
    assert ratio == pytest.approx((sliced - 2 * vocab * devices + trained) / (8 * full_bytes)) and ratio < 1


def test_a_device_downloads_only_what_changed(bench: Any) -> None:
    """The frozen tensors cross the wire once: round 2 downloads only the trained tensors."""
    settings = bench.Settings(clients=2, rounds=2, seeds=(0,), local_steps=1, batch_size=8, seq_len=16, test_size=40,
                              max_train=0, methods=("raffm",), scaling_methods=())
    data = toy_data()
    initial = tiny_model(0)
    fleet = bench.build_fleet(initial, data.subset(range(40, 160)), settings, 0)
    run, _ = bench.run_method("raffm", initial, fleet, data.subset(range(40)), WordHashTokenizer(64), settings, 0,
                              log=lambda _: None)
    # Round 2 downloads no more than was trained (a key bias gets no gradient, so even less), and both devices skip
    # the vocabulary they hold since round 1.
    assert run.bytes_down[1] <= run.bytes_up[1]
    assert run.bytes_down[0] - run.bytes_down[1] >= 2 * 4 * 64 * 32


def test_summary_and_scaling_structure(bench: Any, result: dict[str, Any]) -> None:
    summary = result["summary"]
    assert set(summary) == set(bench.METHODS)
    for method in bench.SCALING_METHODS:
        points = summary[method]["scaling"]
        assert [p["target_fraction"] for p in points] == [0.5, 1.0]
        assert points[-1]["param_fraction"] == pytest.approx(1.0) == points[-1]["flops_fraction"]
        assert 0 < points[0]["flops_fraction"] < 0.75 and points[0]["param_fraction"] < 1
    assert "scaling" not in summary["heterofl"]
    for run in result["runs"]:  # the final model scored once more, on the test and holdout reviews together
        assert 0.0 <= run["holdout_accuracy"] <= 1.0
        assert run["holdout_accuracy"] * 60 == pytest.approx(round(run["holdout_accuracy"] * 60))  # of 40 + 20 reviews
        if run["scaling"]:
            assert run["holdout_accuracy"] == run["scaling"][-1]["holdout_accuracy"]
            assert all(0.0 <= p["holdout_accuracy"] <= 1.0 for p in run["scaling"])
            # each cut also scored matched to the full model on the unlabelled pool, once: on the test and holdout
            # reviews together; the full model is the reference
            assert 0.0 <= run["scaling"][0]["matched_holdout_accuracy"] <= 1.0
            assert run["scaling"][-1]["matched_holdout_accuracy"] == run["scaling"][-1]["holdout_accuracy"]
            assert all(p["matched_accuracy"] is None for p in run["scaling"])
    text = bench.render(result)
    assert "| raffm |" in text and "Inference scaling" in text and "matched (test + holdout)" in text


def test_full_fedavg_of_one_client_with_zero_lr_keeps_the_model(bench: Any) -> None:
    """The loop really aggregates: with a negligible lr the global model after a round equals the initial one."""
    settings = bench.Settings(clients=1, rounds=1, seeds=(0,), local_steps=1, batch_size=8, seq_len=16, lr=1e-30,
                              test_size=40, max_train=0, methods=("fedavg_all",), scaling_methods=())
    data = toy_data()
    initial = tiny_model(0)
    fleet = bench.build_fleet(initial, data.subset(range(40, 160)), settings, 0)
    run, final = bench.run_method("fedavg_all", initial, fleet, data.subset(range(40)), WordHashTokenizer(64),
                                  settings, 0, log=lambda _: None)
    ordered = bench.strategy_named("fedavg").initial(initial.state_dict(), CostModel.from_model(initial))
    for name, tensor in ordered.items():
        torch.testing.assert_close(final.state_dict()[name], tensor, rtol=0, atol=1e-6)
    assert run.accuracy[0] == run.initial_accuracy


def test_a_holdout_that_leaves_no_training_data_is_refused(bench: Any) -> None:
    settings = bench.Settings(clients=2, rounds=1, seeds=(0,), test_size=40, max_train=100, holdout=40,
                              methods=("raffm",), scaling_methods=())
    with pytest.raises(ValueError, match="--holdout 40; lower one of them"):
        bench.run_bench(settings, tiny_model, toy_data(), WordHashTokenizer(64), log=lambda _: None)


def test_bench_pairs_runs_both_views_on_one_split() -> None:
    spec = importlib.util.spec_from_file_location("bench_pairs_under_test", BENCH.with_name("bench_pairs.py"))
    assert spec is not None and spec.loader is not None
    pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairs)
    train, test = pairs.claim_check(0, 12)
    assert len(train) == 10 and len(test) == 2 and set(train.pairs) <= set(pairs.CLAIMS)
    out = pairs.run(0, 1, 12)
    assert set(out) == {"majority", "pairs", "first text only"} and all(0 <= v <= 1 for v in out.values())
