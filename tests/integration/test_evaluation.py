"""The default evaluation hook: after a round, the global model and chosen sub-model sizes are scored on the
server's held-out file, reported in Round.evaluation and as metrics."""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from raffm.costs import CostModel
from raffm.data import load_text_file
from raffm.elastic import extract
from raffm.models import model_from_state
from raffm.scaling import spec_for_fraction
from raffm.threshold import fit_threshold, fleet_prior
from raffm.training import classification_scores, evaluate
from raffm.v1 import aggregator_pb2
from services.aggregator.config import JobConfig
from tests.integration.fedloop import Fleet, tiny_bert_folder, tiny_job

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "movie", "plot", "cast", "story", "very", "not"]


def _model_with_tokenizer(path: Path, **overrides: object) -> Path:
    """The tiny BERT plus a word-level BERT tokenizer in the same folder (what the evaluator loads)."""
    from transformers import BertTokenizer

    tiny_bert_folder(path, **overrides)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    return path


def _eval_file(path: Path) -> Path:
    rng = random.Random(0)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(40):
            w.writerow([" ".join(rng.choices(WORDS, k=6)), rng.randrange(3)])
    return path


def test_global_model_and_sub_models_are_evaluated_after_each_round(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.aggregator")
    model = _model_with_tokenizer(tmp_path / "model")
    data_path = _eval_file(tmp_path / "heldout.csv")
    job = tiny_job(model, rounds=1, clients_per_round=1, quorum=1, eval_data=str(data_path),
                   eval_fractions=(0.25, 1.0))
    fleet = Fleet(tmp_path, job).start()
    try:
        rnd = fleet.one_scripted_round()
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED, rnd
        ev = dict(rnd.evaluation)
        assert set(ev) == {"accuracy", "balanced_accuracy", "accuracy@0.25", "balanced_accuracy@0.25", "params@0.25",
                           "flops@0.25", "accuracy@1", "balanced_accuracy@1", "params@1", "flops@1"}, ev

        # The same numbers, computed directly from the stored version.
        from transformers import AutoTokenizer

        data, tok = load_text_file(data_path), AutoTokenizer.from_pretrained(model)
        global_model = model_from_state(fleet.store.info("job-v1").config, fleet.store.load("job-v1"))
        assert ev["accuracy"] == evaluate(global_model, data, tok, seq_len=job.seq_len)
        scores = classification_scores(global_model, data, tok, seq_len=job.seq_len)
        assert ev["balanced_accuracy"] == scores.balanced_accuracy
        cm = CostModel.from_model(global_model)
        quarter = spec_for_fraction(cm, 0.25, seq_len=job.seq_len)
        assert ev["accuracy@0.25"] == evaluate(extract(global_model, quarter), data, tok, seq_len=job.seq_len)
        assert 0 < ev["flops@0.25"] < 0.5 and ev["flops@1"] == 1.0 == ev["params@1"]
        assert ev["flops@0.25"] < ev["params@0.25"] < 1  # cuts keep the vocabulary and the hidden width
        assert ev["accuracy@1"] == ev["accuracy"]

        text = generate_latest(fleet.metrics).decode()
        assert f'raffm_aggregator_eval{{metric="accuracy",size="full"}} {ev["accuracy"]}' in text
        assert f'raffm_aggregator_eval{{metric="accuracy",size="0.25"}} {ev["accuracy@0.25"]}' in text

        # The aggregator's log says how the model is doing, next to the update count (issue 12, item 8).
        closed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round job-r1 closed")]
        assert closed == [f"round job-r1 closed: 1 update(s), version job-v1; held-out accuracy {ev['accuracy']:.1%} "
                          f"(balanced {ev['balanced_accuracy']:.1%}); "
                          f"by share of the compute 0.25: {ev['accuracy@0.25']:.1%}, 1: {ev['accuracy@1']:.1%}"]
    finally:
        fleet.stop()


def test_with_unlabelled_server_data_cuts_are_matched_and_the_model_served_at_the_fleets_prior(tmp_path: Path) -> None:
    model = _model_with_tokenizer(tmp_path / "model")
    data_path = _eval_file(tmp_path / "heldout.csv")
    rng = random.Random(1)
    unlabelled = tmp_path / "unlabelled.csv"  # a text column only
    unlabelled.write_text("text\n" + "".join(" ".join(rng.choices(WORDS, k=6)) + "\n" for _ in range(60)))
    job = tiny_job(model, rounds=1, clients_per_round=1, quorum=1, eval_data=str(data_path),
                   eval_fractions=(0.25, 1.0), distill_data=str(unlabelled))
    fleet = Fleet(tmp_path, job).start()
    try:
        rnd = fleet.one_scripted_round(metrics={"label_counts": [30, 6, 4]})
        ev = dict(rnd.evaluation)
        assert "matched_accuracy@0.25" in ev and "matched_accuracy@1" not in ev  # the full model is the reference
        from transformers import AutoTokenizer

        from raffm.scaling import CutMatcher

        data, tok = load_text_file(data_path), AutoTokenizer.from_pretrained(model)
        global_model = model_from_state(fleet.store.info("job-v1").config, fleet.store.load("job-v1"))
        cut = extract(global_model, spec_for_fraction(CostModel.from_model(global_model), 0.25, seq_len=job.seq_len))
        CutMatcher(global_model, load_text_file(unlabelled, label_column=None), tok, seq_len=job.seq_len)(cut)
        assert ev["matched_accuracy@0.25"] == evaluate(cut, data, tok, seq_len=job.seq_len)
        # served: the threshold fitted on the unlabelled inputs to the label shares the round's device reported
        fit_threshold(global_model, load_text_file(unlabelled, label_column=None), tok, fleet_prior([30, 6, 4]),
                      seq_len=job.seq_len)
        served = classification_scores(global_model, data, tok, seq_len=job.seq_len)
        assert (ev["served_accuracy"], ev["served_balanced_accuracy"]) == (served.accuracy, served.balanced_accuracy)
        text = generate_latest(fleet.metrics).decode()
        assert f'raffm_aggregator_eval{{metric="matched_accuracy",size="0.25"}} {ev["matched_accuracy@0.25"]}' in text
        assert f'raffm_aggregator_eval{{metric="served_accuracy",size="full"}} {ev["served_accuracy"]}' in text
    finally:
        fleet.stop()


def test_eval_settings_are_validated(tmp_path: Path) -> None:
    assert JobConfig(eval_fractions="0.25, 0.5,1").eval_fractions == (0.25, 0.5, 1.0)  # type: ignore[arg-type]
    assert JobConfig().eval_data == "" and JobConfig().to_dict()["eval_fractions"] == []  # off by default
    with pytest.raises(ValueError, match="eval_fractions"):
        JobConfig(eval_fractions=(0.0, 0.5))
    with pytest.raises(ValueError, match="eval_fractions"):
        JobConfig(eval_fractions="half")  # type: ignore[arg-type]
    from services.aggregator.evaluation import default_evaluator

    no_tokenizer = tiny_bert_folder(tmp_path / "bare")
    job = JobConfig(model=str(no_tokenizer), num_labels=3, eval_data=str(_eval_file(tmp_path / "e.csv")))
    with pytest.raises(ValueError, match="tokenizer"):
        default_evaluator(job)
    assert default_evaluator(JobConfig()) is None
