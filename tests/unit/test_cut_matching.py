"""raffm.scaling.CutMatcher: a cut refitted, without labels, to compute what the full model computes."""

from __future__ import annotations

import pytest
import torch

from raffm.arch import adapter_for
from raffm.costs import CostModel
from raffm.data import ImageDataset, TextDataset
from raffm import scaling
from raffm.elastic import extract
from raffm.scaling import (
    CutMatcher,
    fidelity,
    input_projections,
    residual_projections,
    scaling_table,
    spec_for_fraction,
)
from raffm.spec import ElasticSpec
from raffm.spp import prioritize
from raffm.training import LocalConfig, batches, train_local
from tests.unit.models_fixtures import make
from tests.unit.toys import WordHashTokenizer, tiny_model, toy_data

TOKENIZER = WordHashTokenizer(64)


def _trained() -> torch.nn.Module:
    """A tiny BERT whose body learned the toy task (at this initializer range a cut computes something else)."""
    model = prioritize(tiny_model(0, initializer_range=0.2))
    train_local(model, toy_data(160), TOKENIZER, LocalConfig(batch_size=8, seq_len=16, lr=1e-3, local_steps=40))
    return model.eval()


def test_a_matched_cut_follows_the_full_model_and_only_its_projections_move() -> None:
    full = _trained()
    dims = adapter_for(full).dims(full.config)
    cut = extract(full, ElasticSpec.uniform(dims, heads=2, ffn=64))  # a quarter of the heads, an eighth of the FFN
    unlabelled, probe = toy_data(200, seed=5), toy_data(200, seed=6)
    before = {n: t.clone() for n, t in cut.state_dict().items()}
    full_before = {n: t.clone() for n, t in full.state_dict().items()}
    own = fidelity(full, cut, probe, TOKENIZER, seq_len=16, max_examples=200)
    CutMatcher(full, unlabelled, TOKENIZER, seq_len=16)(cut)
    matched = fidelity(full, cut, probe, TOKENIZER, seq_len=16, max_examples=200)
    assert own["hidden_cosine"] < 0.6 and matched["hidden_cosine"] > 0.95, (own, matched)
    assert matched["prediction_agreement"] >= max(0.95, own["prediction_agreement"]), (own, matched)
    moved = {n for n, t in cut.state_dict().items() if not torch.equal(t, before[n])}
    assert moved == {f"bert.encoder.layer.{i}.{m}.{p}" for i in range(2)
                     for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                               "attention.output.dense", "intermediate.dense", "output.dense")
                     for p in ("weight", "bias")}
    assert all(torch.equal(t, full_before[n]) for n, t in full.state_dict().items())
    # the labels are never read: the same inputs with every label flipped give the same cut
    again = extract(full, ElasticSpec.uniform(dims, heads=2, ffn=64))
    flipped = TextDataset(unlabelled.texts, [1 - y for y in unlabelled.labels], unlabelled.label_names)
    CutMatcher(full, flipped, TOKENIZER, seq_len=16)(again)
    assert all(torch.equal(t, again.state_dict()[n]) for n, t in cut.state_dict().items())


def _inputs(kind: str, n: int, seed: int) -> tuple[TextDataset | ImageDataset, WordHashTokenizer | None]:
    if kind.startswith("vit"):
        images = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        return ImageDataset(images, [0] * n, [str(d) for d in range(10)]), None
    return toy_data(n, seed=seed), TOKENIZER


def _error(full: torch.nn.Module, cut: torch.nn.Module, data: TextDataset | ImageDataset,
           tokenizer: WordHashTokenizer | None) -> float:
    """The cut's output (logits, or last hidden state) off the full model's, relative to the full model's."""
    with torch.no_grad():
        outs = [[m(**{k: v for k, v in b.items() if k != "labels"}) for m in (full, cut)]
                for b in batches(data, tokenizer, 32, 12, shuffle=False)]
    pick = [[o.logits if hasattr(o, "logits") else o.last_hidden_state for o in pair] for pair in outs]
    diff = sum(float((a - b).pow(2).sum()) for a, b in pick)
    return (diff / sum(float(a.pow(2).sum()) for a, _ in pick)) ** 0.5


@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "deberta", "electra-small", "modernbert", "vit",
                                  "gpt2", "opt", "phi", "neox", "neox-base", "llama-tied"])
def test_matching_brings_a_cut_of_every_family_closer_to_the_full_model(kind: str, monkeypatch) -> None:
    full = make(kind).eval()
    spec = spec_for_fraction(CostModel.from_model(full), 0.5, seq_len=12)
    cut = extract(full, spec).eval()
    unlabelled, tokenizer = _inputs(kind, 120, seed=1)
    probe, _ = _inputs(kind, 60, seed=2)
    before = _error(full, cut, probe, tokenizer)
    matcher = CutMatcher(full, unlabelled, tokenizer, seq_len=12)
    matcher(cut)
    after = _error(full, cut, probe, tokenizer)
    assert after < 0.8 * before, (before, after)
    # Passes that skip the refitted layers (replaying what they output) refit the cut as passes through every layer do
    monkeypatch.setattr(scaling, "_start", lambda *_args: None)
    again = extract(full, spec).eval()
    matcher(again)
    assert all(torch.allclose(t, again.state_dict()[n], rtol=1e-4, atol=1e-6) for n, t in cut.state_dict().items())
    residual = residual_projections(full)
    assert len(residual) == 2 * full.config.num_hidden_layers
    assert sorted(n for step in matcher.steps for n in step) == sorted(residual + input_projections(full))
    if kind == "neox":  # parallel residuals: what follows the attention output is the FFN's LayerNorm of the input
        assert [matcher.sums[n] for n in residual[:2]] == [False, True]
    elif kind != "deberta":
        assert all(matcher.sums.values()), matcher.sums


def test_the_projections_into_the_residual_stream_are_found_by_their_axes() -> None:
    assert residual_projections(make("bert"))[:2] == ["bert.encoder.layer.0.attention.output.dense",
                                                      "bert.encoder.layer.0.output.dense"]
    assert residual_projections(make("gpt2"))[:2] == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    assert residual_projections(make("llama-tied"))[:2] == ["model.layers.0.self_attn.o_proj",
                                                            "model.layers.0.mlp.down_proj"]
    assert residual_projections(make("distilbert"))[:2] == ["distilbert.transformer.layer.0.attention.out_lin",
                                                            "distilbert.transformer.layer.0.ffn.lin2"]


def test_the_projections_that_read_the_residual_stream_are_refitted_in_order_grouped_by_their_input() -> None:
    assert input_projections(make("gpt2"))[:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    for kind, first in [("bert", ["bert.encoder.layer.0.attention.self." + m for m in ("query", "key", "value")]
                         + ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.intermediate.dense",
                            "bert.encoder.layer.0.output.dense"]),
                        ("llama-tied", ["model.layers.0.self_attn." + m for m in ("q_proj", "k_proj", "v_proj")]
                         + ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj",
                            "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"])]:
        full = make(kind).eval()
        data, tokenizer = _inputs(kind, 20, seed=1)
        steps = CutMatcher(full, data, tokenizer, seq_len=12).steps
        grouped = [first[:3], first[3:4]] + ([first[4:5], first[5:6]] if kind == "bert" else [first[4:6], first[6:]])
        assert steps[:4] == grouped, steps[:4]


def test_the_scaling_table_scores_each_cut_as_cut_and_matched() -> None:
    full = _trained()
    points = scaling_table(full, toy_data(120, seed=6), TOKENIZER, fractions=(0.25, 1.0), seq_len=16,
                           unlabelled=toy_data(200, seed=5))
    assert [p.target_fraction for p in points] == [0.25, 1.0]
    assert points[1].matched_accuracy == points[1].accuracy  # the full model is the reference itself
    assert points[0].matched_accuracy is not None and points[0].matched_accuracy >= points[0].accuracy
    assert all(p.matched_accuracy is None for p in scaling_table(full, toy_data(40), TOKENIZER, fractions=(0.25,),
                                                                seq_len=16))
    with pytest.raises(ValueError, match="at least 10 unlabelled examples"):
        CutMatcher(tiny_model(0), toy_data(4), TOKENIZER)
    with pytest.raises(ValueError, match="a cut made by raffm.elastic.extract"):
        CutMatcher(full, toy_data(20), TOKENIZER, seq_len=16)(tiny_model(1))


def test_served_cuts_predict_as_the_prior_says_and_leave_the_model_alone() -> None:
    full = _trained()
    before = {n: t.clone() for n, t in full.state_dict().items()}
    test = toy_data(120, seed=6)
    only_first = torch.tensor([1.0, 0.0])  # a prior that allows one label: every served cut predicts it
    points = scaling_table(full, test, TOKENIZER, fractions=(0.25, 1.0), seq_len=16, unlabelled=toy_data(200, seed=5),
                           prior=only_first)
    first_rate = sum(1 for y in test.labels if y == 0) / len(test)
    assert 0 < first_rate < 1 and all(p.served_accuracy == pytest.approx(first_rate) for p in points), points
    assert all(torch.equal(before[n], t) for n, t in full.state_dict().items())  # served copies, not the model
    with pytest.raises(ValueError, match="needs the unlabelled inputs"):
        scaling_table(full, test, TOKENIZER, fractions=(1.0,), seq_len=16, prior=only_first)
