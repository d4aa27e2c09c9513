"""The strategy's server distillation step in the aggregator: every published version's cuts have learned its logits
on the server's unlabelled data, and its settings are checked before a job starts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from raffm.data import rotten_tomatoes
from raffm.models import model_from_state
from raffm.planning import cost_model_for
from raffm.training import NestedCut
from raffm.v1 import aggregator_pb2
from services.aggregator.config import JobConfig
from services.aggregator.distillation import load_distill_data
from services.aggregator.evaluation import heldout_split
from tests.integration.fedloop import Fleet, tiny_job
from tests.integration.test_evaluation import WORDS, _model_with_tokenizer


def _unlabelled(path: Path, n: int = 48) -> Path:
    """Server data as a JSON-lines file with a text column and nothing else."""
    rng = random.Random(1)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=6))}) + "\n" for _ in range(n)))
    return path


def _publish_one_round(root: Path, job: JobConfig) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Round 1 of ``job`` with one scripted update; the version it published and its config."""
    fleet = Fleet(root, job).start()
    try:
        assert fleet.one_scripted_round().state == aggregator_pb2.ROUND_STATE_CLOSED
        return fleet.store.load("job-v1"), fleet.store.info("job-v1").config
    finally:
        fleet.stop()


def _cuts_divergence(state: dict[str, torch.Tensor], config: dict[str, object], job: JobConfig, texts: Path) -> float:
    """Mean KL(full || cut) of the job's cuts on the server's texts."""
    from transformers import AutoTokenizer

    model = model_from_state(config, state).eval()
    batch = AutoTokenizer.from_pretrained(job.model)(load_distill_data(str(texts)).texts, padding=True,
                                                     return_tensors="pt")
    cuts = job.method().cuts(cost_model_for(config))
    with torch.no_grad():
        full = torch.log_softmax(model(**batch).logits, -1)
        return sum(float(torch.nn.functional.kl_div(torch.log_softmax(NestedCut(model, c)(**batch).logits, -1), full,
                                                    reduction="batchmean", log_target=True)) for c in cuts) / len(cuts)


def test_every_version_is_published_after_its_cuts_learned_its_logits_on_the_servers_unlabelled_data(
        tmp_path: Path) -> None:
    # Wide initial weights: the cuts of this tiny model then compute something else than the model does.
    model = _model_with_tokenizer(tmp_path / "model", num_attention_heads=8, intermediate_size=256,
                                  initializer_range=0.2)
    texts = _unlabelled(tmp_path / "server.jsonl")
    plain_job = tiny_job(model, rounds=1, clients_per_round=1, quorum=1, lr=1e-3)
    job = tiny_job(model, rounds=1, clients_per_round=1, quorum=1, lr=1e-3, distill_data=str(texts),
                   strategy_options={"nested_fractions": [0.25, 0.5, 0.75], "server_distill_steps": 20})
    plain, config = _publish_one_round(tmp_path / "plain", plain_job)
    distilled, _ = _publish_one_round(tmp_path / "distilled", job)
    frozen = job.method().server_distill_recipe(cost_model_for(config)).frozen
    assert frozen and all(torch.equal(plain[n], distilled[n]) for n in frozen)  # what devices cache stays put
    assert any(not torch.equal(plain[n], distilled[n]) for n in plain if n not in frozen)
    before, after = _cuts_divergence(plain, config, job, texts), _cuts_divergence(distilled, config, job, texts)
    assert after < 0.5 * before, (before, after)


def test_distillation_settings_are_checked_and_the_built_in_corpus_gives_its_training_part(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distill_data"):
        JobConfig(strategy_options={"nested_fractions": [0.5], "server_distill_steps": 5})
    with pytest.raises(ValueError, match="server_distill_steps is -1"):
        JobConfig(strategy_options={"server_distill_steps": -1}, distill_data="rotten_tomatoes")
    (tmp_path / "reviews.jsonl").write_text('{"blurb": "a fine film"}\n')
    with pytest.raises(ValueError, match="has no text column of a known name"):
        load_distill_data(str(tmp_path / "reviews.jsonl"))
    full = rotten_tomatoes()
    train, test = heldout_split(full)
    assert load_distill_data("rotten_tomatoes").texts == [full.texts[i] for i in train] and not set(train) & set(test)
