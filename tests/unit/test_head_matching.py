"""raffm.scaling.matched_head: a cut's head refitted, without labels, to predict what the full model predicts."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from raffm.arch import adapter_for
from raffm.data import TextDataset
from raffm.elastic import extract
from raffm.scaling import head_layer, matched_head, scaling_table
from raffm.spec import ElasticSpec
from raffm.spp import prioritize
from raffm.training import LocalConfig, train_local
from tests.unit.models_fixtures import make
from tests.unit.toys import WordHashTokenizer, tiny_model, toy_data

TOKENIZER = WordHashTokenizer(64)


def _trained() -> torch.nn.Module:
    """A tiny BERT whose body learned the toy task (at this initializer range a cut computes something else)."""
    model = prioritize(tiny_model(0, initializer_range=0.2))
    train_local(model, toy_data(160), TOKENIZER, LocalConfig(batch_size=8, seq_len=16, lr=1e-3, local_steps=40))
    return model.eval()


def _agreement(cut: torch.nn.Module, full: torch.nn.Module, data: TextDataset) -> float:
    batch = TOKENIZER(data.texts, max_length=16)
    with torch.no_grad():
        return float((cut.eval()(**batch).logits.argmax(-1) == full(**batch).logits.argmax(-1)).float().mean())


def test_a_matched_head_brings_a_cut_to_the_full_models_predictions_without_reading_labels() -> None:
    full = _trained()
    dims = adapter_for(full).dims(full.config)
    cut = extract(full, ElasticSpec.uniform(dims, heads=4, ffn=8, hidden=16))  # half the residual width: new features
    unlabelled, probe = toy_data(200, seed=5), toy_data(200, seed=6)
    before = [[p.detach().clone() for p in m.parameters()] for m in (full, cut)]
    head = matched_head(cut, full, unlabelled, TOKENIZER, seq_len=16)
    assert set(head) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(p, q) for m, b in zip((full, cut), before) for p, q in zip(m.parameters(), b))
    own = _agreement(cut, full, probe)
    cut.load_state_dict(head, strict=False)
    matched = _agreement(cut, full, probe)
    assert own < 0.5 and matched >= 0.9, (own, matched)
    flipped = TextDataset(unlabelled.texts, [1 - y for y in unlabelled.labels], unlabelled.label_names)
    again = matched_head(cut, full, flipped, TOKENIZER, seq_len=16)
    assert all(torch.equal(again[n], head[n]) for n in head)  # the labels are never read


def test_the_scaling_table_scores_each_cut_with_and_without_its_head_matched() -> None:
    full = _trained()
    points = scaling_table(full, toy_data(120, seed=6), TOKENIZER, fractions=(0.25, 1.0), seq_len=16,
                           unlabelled=toy_data(200, seed=5))
    assert [p.target_fraction for p in points] == [0.25, 1.0]
    assert points[1].matched_accuracy == points[1].accuracy  # the full model keeps its own head
    assert points[0].matched_accuracy is not None and 0 <= points[0].matched_accuracy <= 1
    assert all(p.matched_accuracy is None for p in scaling_table(full, toy_data(40), TOKENIZER, fractions=(0.25,),
                                                                seq_len=16))


def test_the_head_layer_is_the_one_that_outputs_the_labels() -> None:
    assert head_layer(make("roberta"))[0] == "classifier.out_proj"
    assert head_layer(make("vit"))[0] == "classifier"
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, pad_token_id=0))
    assert head_layer(gpt2)[0] == "score"
    with pytest.raises(ValueError, match="'score' reads every position, not one pooled vector"):
        matched_head(gpt2, gpt2, toy_data(12), TOKENIZER, seq_len=8)
    with pytest.raises(ValueError, match="no task head with 2 outputs"):
        head_layer(make("gpt2"))  # a causal LM
    with pytest.raises(ValueError, match="at least 10 unlabelled examples"):
        matched_head(tiny_model(0), tiny_model(0), toy_data(4), TOKENIZER)
