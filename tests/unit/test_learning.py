"""RaFFM learns: a heterogeneous fleet fine-tunes a small pretrained model on a toy task through the product's strategy,
training loop and sliced FedAvg (bench_fl's in-process driver), and every cut of the result, matched to it on
unlabelled inputs as it is before it serves (raffm.scaling.CutMatcher), works.

The "foundation model" is a tiny BERT pretrained in a few seconds on the same kind of reviews, then given a fresh
classification head, so the federated rounds must learn the head and keep the features. The sbc and phone tiers can
only train slices. The test fails if the global model stops learning, or if its smallest cut falls near chance.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from raffm.training import LocalConfig, evaluate, train_local
from tests.unit.test_bench_smoke import _load_bench
from tests.unit.toys import WordHashTokenizer, tiny_model, toy_data

TOKENIZER = WordHashTokenizer(64)


def pretrained(seed: int) -> Any:
    model = tiny_model(seed, hidden_size=64, num_attention_heads=8, intermediate_size=512, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    train_local(model, toy_data(2000, seed=100 + seed), TOKENIZER,
                LocalConfig(batch_size=32, seq_len=12, lr=3e-4, local_steps=400, warmup_steps=40, seed=seed))
    assert evaluate(model, toy_data(200, seed=7), TOKENIZER, seq_len=12) >= 0.8, "pretraining failed"
    torch.manual_seed(seed)
    model.classifier.reset_parameters()  # the task head is new: the rounds must learn it
    return model.eval()


@pytest.mark.timeout(300)
def test_a_heterogeneous_fleet_learns_and_every_cut_works() -> None:
    bench = _load_bench()
    settings = bench.Settings(clients=8, rounds=3, seeds=(0,), local_steps=10, batch_size=16, seq_len=12, lr=1e-3,
                              warmup_steps=3, test_size=200, max_train=600, distill_pool=200, holdout=0,
                              methods=("raffm",), scaling_methods=("raffm",), fractions=(0.25, 0.5, 1.0), threads=1)
    result = bench.run_bench(settings, pretrained, toy_data(1000), TOKENIZER, log=lambda _: None)
    run = result["runs"][0]
    fleet = result["fleets"]["0"]
    assert not fleet[0]["full_model"] and fleet[-1]["full_model"]  # heterogeneous: small tiers train slices
    assert run["initial_accuracy"] < 0.75 and run["accuracy"][-1] >= 0.9, run["accuracy"]
    for point in run["scaling"]:  # the quarter-compute cut too, far from chance (0.5); served as it would serve
        assert point["matched_accuracy"] >= 0.85 and point["served_accuracy"] >= 0.85, point
    assert run["scaling"][0]["flops_fraction"] < 0.35
