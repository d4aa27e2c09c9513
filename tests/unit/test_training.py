"""The local training loop and its recipe: frozen tensors, nested cuts on shared weights, samples trained."""

from __future__ import annotations

import pytest
import torch

from raffm.arch import adapter_for
from raffm.elastic import extract
from raffm.proto import recipe_from_proto, recipe_to_proto
from raffm.recipe import Recipe
from raffm.slicing import slice_plan
from raffm.spec import ElasticSpec
from raffm.spp import prioritize
from raffm.data import TextDataset
from raffm.training import (
    LocalConfig, NestedCut, Scores, classification_scores, distill_cuts, evaluate, train_local, with_delta,
)
from tests.unit.models_fixtures import inputs, make
from tests.unit.toys import WordHashTokenizer, tiny_model, toy_data

VOCAB = "bert.embeddings.word_embeddings.weight"


@pytest.mark.parametrize("kind", ["bert", "roberta", "camembert", "distilbert", "deberta", "opt", "opt-classifier",
                                  "phi", "phi-classifier", "gpt2", "gpt2-classifier", "neox", "neox-classifier",
                                  "modernbert", "modernbert-cls", "vit"])
def test_a_nested_cut_computes_exactly_the_extracted_cut(kind: str) -> None:
    model = prioritize(make(kind))
    dims = adapter_for(model).dims(model.config)
    heads = min(3, dims.heads)  # the Phi classifier has 2 KV heads
    outer = ElasticSpec.uniform(dims, heads=heads, ffn=72)
    inner = ElasticSpec.uniform(dims, heads=heads - 1, ffn=40)
    device_model = extract(model, outer).eval()
    cut = NestedCut(device_model, inner)
    batch = inputs(kind)
    with torch.no_grad():
        expected = extract(model, inner).eval()(**batch).logits
        got = cut(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_nested_cut_trains_only_its_own_block_of_the_shared_weights() -> None:
    model = prioritize(make("bert"))
    dims = adapter_for(model).dims(model.config)
    outer, inner = ElasticSpec.full(dims), ElasticSpec.uniform(dims, heads=2, ffn=40)
    cut = NestedCut(model.train(), inner)
    cut(**inputs("bert")).logits.square().sum().backward()
    plan = slice_plan(adapter_for(model), dims, inner, {n: tuple(p.shape) for n, p in model.named_parameters()},
                      within=outer)
    ffn_in = "bert.encoder.layer.0.intermediate.dense.weight"
    grad = model.get_parameter(ffn_in).grad
    assert grad is not None and grad[:40].abs().sum() > 0 and grad[40:].abs().sum() == 0
    assert plan[ffn_in].sub_shape == (40, 48)


@pytest.mark.parametrize("kind", ["opt", "llama-tied", "gpt2"])
def test_a_nested_cut_of_a_tied_causal_lm_computes_its_head_with_the_shared_embedding(kind: str) -> None:
    """A tied LM head is the token embedding: the cut's skeleton must bind it with the embedding's view, also when the
    cut is narrower than the hidden width (the skeleton's head is re-tied to its resized embedding)."""
    model = prioritize(make(kind))
    dims = adapter_for(model).dims(model.config)
    device_model = extract(model, ElasticSpec.uniform(dims, heads=3, ffn=72)).eval()
    inner = ElasticSpec.uniform(dims, heads=2, ffn=40, hidden=dims.hidden - 8)
    batch = inputs(kind)
    with torch.no_grad():
        expected = extract(model, inner).eval()(**batch).logits
        got = NestedCut(device_model, inner)(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_nested_cut_must_fit_inside_the_model() -> None:
    model = make("bert")
    dims = adapter_for(model).dims(model.config)
    small = extract(prioritize(model), ElasticSpec.uniform(dims, heads=2, ffn=40))
    with pytest.raises(ValueError, match="not nested in"):
        NestedCut(small, ElasticSpec.uniform(dims, heads=3, ffn=40))


def _train(recipe: Recipe, model: torch.nn.Module | None = None,
           **config: object) -> tuple[torch.nn.Module, dict[str, torch.Tensor], object]:
    model = model or tiny_model(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    local = LocalConfig(**{"batch_size": 8, "seq_len": 16, "lr": 1e-3, "local_steps": 3, **config})  # type: ignore[arg-type]
    result = train_local(model, toy_data(40), WordHashTokenizer(64), local, recipe=recipe)
    return model, before, result


def test_sgd_steps_by_the_gradient_where_adamw_steps_by_its_sign() -> None:
    _, _, adamw = _train(Recipe(), local_steps=1, weight_decay=0.0)
    _, _, sgd = _train(Recipe(), local_steps=1, weight_decay=0.0, optimizer="sgd")
    a, s = adamw.delta["classifier.weight"], sgd.delta["classifier.weight"]  # type: ignore[attr-defined]
    # AdamW's first step moves every weight by lr against its gradient's sign; SGD by lr x the gradient itself
    assert torch.allclose(a.abs(), torch.full_like(a, 1e-3), rtol=1e-3)
    assert torch.equal(s.sign(), a.sign())
    assert float(s.abs().std() / s.abs().mean()) > 0.1 and float(s.abs().max()) < 1e-3
    with pytest.raises(ValueError, match="optimizer is 'lion'; choose one of adamw, sgd"):
        LocalConfig(optimizer="lion")


def test_frozen_tensors_do_not_move_and_have_no_delta() -> None:
    model, before, result = _train(Recipe(frozen=frozenset({VOCAB})))
    assert VOCAB not in result.delta  # type: ignore[attr-defined]
    assert torch.equal(model.get_parameter(VOCAB), before[VOCAB])
    moved = {n for n, d in result.delta.items() if d.abs().sum() > 0}  # type: ignore[attr-defined]
    assert "classifier.weight" in moved and "bert.encoder.layer.0.intermediate.dense.weight" in moved


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # layer 1's hook: its inputs need no gradient
@pytest.mark.parametrize("checkpointing", [False, True])
def test_frozen_first_layers_do_not_move_and_the_layers_above_them_train(checkpointing: bool) -> None:
    model = tiny_model(0)
    below = frozenset(n for n, _ in model.named_parameters() if ".embeddings." in n or ".layer.0." in n)
    backward_through = []  # no gradient flows below the first trained layer, checkpointed or not
    model.bert.encoder.layer[0].register_full_backward_hook(lambda *_: backward_through.append(0))
    model.bert.encoder.layer[1].register_full_backward_hook(lambda *_: backward_through.append(1))
    model, before, result = _train(Recipe(frozen=below, frozen_dtype="float16", checkpointing=checkpointing),
                                   model=model)
    assert set(backward_through) == {1}
    assert not below & set(result.delta)  # type: ignore[attr-defined]
    assert all(torch.equal(model.get_parameter(n), before[n].to(model.get_parameter(n).dtype)) for n in below)
    # only the vocabulary is stored at half precision; the frozen layer keeps its float32 weights
    assert model.get_parameter(VOCAB).dtype == torch.float16
    assert model.get_parameter("bert.encoder.layer.0.intermediate.dense.weight").dtype == torch.float32
    assert result.delta["bert.encoder.layer.1.attention.self.query.weight"].abs().sum() > 0  # type: ignore[attr-defined]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_head_only_recipe_trains_the_head_at_its_scaled_lr_and_runs_no_backward_through_the_body() -> None:
    model = tiny_model(0)
    head = {"classifier.weight", "classifier.bias"}
    body = frozenset(n for n, _ in model.named_parameters()) - head
    backward_through = []
    model.bert.encoder.layer[-1].register_full_backward_hook(lambda *_: backward_through.append(1))
    model, before, result = _train(Recipe(frozen=body, lr_scale=4.0), model=model, local_steps=1)
    assert not backward_through and set(result.delta) == head  # type: ignore[attr-defined]
    # AdamW's first step moves every weight by about lr (its gradient over its own magnitude): 4 x 1e-3 here
    step = result.delta["classifier.weight"].abs()  # type: ignore[attr-defined]
    assert step.max().item() == pytest.approx(4e-3, rel=1e-3)
    with pytest.raises(ValueError, match="lr_scale is 0"):
        Recipe(lr_scale=0.0)


def test_the_update_weight_is_the_samples_trained_this_round() -> None:
    _, _, result = _train(Recipe(), local_steps=3)
    assert result.samples == 24 and result.steps == 3  # type: ignore[attr-defined]
    _, _, one_epoch = _train(Recipe(), local_steps=0)
    assert one_epoch.samples == 40  # type: ignore[attr-defined]


def test_nested_cuts_change_the_update_and_stay_deterministic() -> None:
    dims = adapter_for(tiny_model(0)).dims(tiny_model(0).config)
    cuts = (ElasticSpec.uniform(dims, heads=2, ffn=128), ElasticSpec.uniform(dims, heads=4, ffn=256))
    _, _, plain = _train(Recipe())
    _, _, sandwich = _train(Recipe(nested=cuts))
    _, _, again = _train(Recipe(nested=cuts))
    ffn = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(plain.delta[ffn], sandwich.delta[ffn])  # type: ignore[attr-defined]
    assert torch.equal(sandwich.delta[ffn], again.delta[ffn])  # type: ignore[attr-defined]


@pytest.mark.parametrize("dropout", [True, False])
def test_a_recipe_without_dropout_drops_nothing_in_the_spec_or_its_nested_cuts(dropout: bool) -> None:
    dims = adapter_for(tiny_model(0)).dims(tiny_model(0).config)
    cuts = (ElasticSpec.uniform(dims, heads=2, ffn=128),)
    dropped = []  # every dropout call in training that changed its input, seen from a hook on every module

    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Dropout) and not torch.equal(args[0], out):
            dropped.append(module)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        _train(Recipe(nested=cuts, dropout=dropout), model=tiny_model(0, hidden_dropout_prob=0.3))
    finally:
        handle.remove()
    assert bool(dropped) == dropout


def test_a_half_precision_vocabulary_is_looked_up_in_float32_by_the_spec_and_its_nested_cuts() -> None:
    """DeBERTa-v3's input embedding is the word table alone, so no type promotion (a sum with float32 position
    tables, as in BERT) turns a half-precision lookup back into float32: the spec and every nested cut must."""
    from raffm.costs import CostModel
    from raffm.strategy import strategy_named

    model = prioritize(make("deberta")).train()
    cost_model = CostModel.from_model(model)
    nested = strategy_named("raffm").with_options(nested_fractions=(0.25, 0.5, 0.75))
    recipe = nested.recipe_for(ElasticSpec.full(cost_model.dims), cost_model)
    assert recipe.frozen_dtype == "float16" and recipe.nested
    model, before, result = _train(recipe, model)
    assert model.deberta.embeddings.word_embeddings.weight.dtype == torch.float16
    assert result.steps == 3 and all(torch.isfinite(d).all() for d in result.delta.values())
    assert not torch.equal(before["classifier.weight"], model.classifier.weight)


def test_a_recipe_naming_unknown_tensors_is_refused() -> None:
    with pytest.raises(ValueError, match="freezes tensors the model does not have"):
        _train(Recipe(frozen=frozenset({"no.such.weight"})))
    with pytest.raises(ValueError, match="distill is 2"):
        Recipe(distill=2.0)


def test_a_recipe_round_trips_through_a_dict() -> None:
    dims = adapter_for(tiny_model(0)).dims(tiny_model(0).config)
    recipe = Recipe(frozen=frozenset({VOCAB}), nested=(ElasticSpec.uniform(dims, heads=2, ffn=128),), sampled=0,
                    distill=0.5, prior_correction=0.5, lr_scale=4.0, dropout=False)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe_from_proto(recipe_to_proto(recipe)) == recipe


def test_prior_correction_keeps_a_one_sided_device_from_teaching_its_label_prior() -> None:
    """A device whose data is nearly all one label: with plain cross-entropy its update moves the classifier's bias
    toward that label; with the logit adjustment (tau = 1) the bias barely moves, so averaging such updates does not
    drag the shared model toward whichever labels the skewed devices hold."""
    data = toy_data(200)
    skewed = data.subset([i for i, y in enumerate(data.labels) if y == 1] + [i for i, y in enumerate(data.labels)
                                                                             if y == 0][:5])

    def bias_shift(tau: float) -> float:
        local = LocalConfig(batch_size=8, seq_len=16, lr=1e-3, local_steps=10)
        result = train_local(tiny_model(0), skewed, WordHashTokenizer(64), local, recipe=Recipe(prior_correction=tau))
        bias = result.delta["classifier.bias"]
        return float(bias[1] - bias[0])

    plain, adjusted = bias_shift(0.0), bias_shift(1.0)
    assert plain > 0.005, "plain cross-entropy should push the bias toward the device's label"
    assert abs(adjusted) < plain / 2, (plain, adjusted)


def test_prior_correction_must_be_non_negative_and_labels_must_fit_the_model() -> None:
    with pytest.raises(ValueError, match="prior_correction is -1"):
        Recipe(prior_correction=-1.0)
    data = toy_data(20)
    three = type(data)(data.texts, [2] * len(data.labels), ("a", "b", "c"))
    with pytest.raises(ValueError, match="labels up to 2; the model has 2 labels"):
        train_local(tiny_model(0), three, WordHashTokenizer(64), LocalConfig(batch_size=8, seq_len=16, local_steps=1),
                    recipe=Recipe(prior_correction=1.0))


class _Constant(torch.nn.Module):
    """Predicts ``label`` for every input (logits of two classes)."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, input_ids: torch.Tensor, **_: object) -> object:
        logits = torch.zeros(input_ids.shape[0], 2)
        logits[:, self.label] = 1.0
        return type("Out", (), {"logits": logits})()


def test_balanced_accuracy_sees_a_one_label_model_for_what_it_is() -> None:
    data = TextDataset([f"review {i}" for i in range(10)], [1] * 7 + [0] * 3, ("rotten", "fresh"))
    scores = classification_scores(_Constant(1), data, WordHashTokenizer(64), seq_len=8)
    assert scores == Scores(accuracy=pytest.approx(0.7), balanced_accuracy=pytest.approx(0.5))
    assert classification_scores(_Constant(0), data, WordHashTokenizer(64), seq_len=8).accuracy == pytest.approx(0.3)
    # A real model: the accuracy is evaluate()'s.
    model = tiny_model(0)
    scores = classification_scores(model, toy_data(40), WordHashTokenizer(64), seq_len=16)
    assert 0.0 <= scores.balanced_accuracy <= 1.0 and scores.accuracy == evaluate(model, toy_data(40),
                                                                                   WordHashTokenizer(64), seq_len=16)


def _cut_divergences(model: torch.nn.Module, cuts: tuple[ElasticSpec, ...], data: TextDataset) -> list[float]:
    """KL(full || cut) of each cut's predictions on ``data``, with the model in eval mode."""
    batch = WordHashTokenizer(64)(data.texts, max_length=16)
    with torch.no_grad():
        full = torch.log_softmax(model.eval()(**batch).logits, -1)
        return [float(torch.nn.functional.kl_div(torch.log_softmax(NestedCut(model, c)(**batch).logits, -1), full,
                                                 reduction="batchmean", log_target=True)) for c in cuts]


def test_server_distillation_brings_every_cut_to_the_full_model_without_moving_it_and_reads_no_label() -> None:
    # A model whose body learned the task, and cuts that have not learned to follow it (at the default initializer
    # range the tiny model's layers hardly move its residual stream, so every cut computes what the model does).
    def trained() -> torch.nn.Module:
        return _train(Recipe(), model=prioritize(tiny_model(0, initializer_range=0.2)), local_steps=40)[0]

    model = trained()
    dims = adapter_for(model).dims(model.config)
    cuts = (ElasticSpec.uniform(dims, heads=2, ffn=128), ElasticSpec.uniform(dims, heads=4, ffn=256))
    unlabelled, probe = toy_data(80, seed=3), toy_data(60, seed=4)
    config = LocalConfig(batch_size=8, seq_len=16, lr=1e-3, local_steps=30, seed=1)
    before = _cut_divergences(model, cuts, probe)
    with torch.no_grad():
        full_before = model.eval()(**WordHashTokenizer(64)(probe.texts, max_length=16)).logits.argmax(-1)
    result = distill_cuts(model, unlabelled, WordHashTokenizer(64), config, recipe=Recipe(nested=cuts))
    after = _cut_divergences(model, cuts, probe)
    assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
    with torch.no_grad():
        full_after = model.eval()(**WordHashTokenizer(64)(probe.texts, max_length=16)).logits.argmax(-1)
    assert (full_after == full_before).float().mean() >= 0.95  # the full model is held to its own predictions
    assert result.steps == 30 and result.samples == 240 and result.loss > 0
    # The labels are never read: other labels, the same step.
    flipped = TextDataset(unlabelled.texts, [1 - y for y in unlabelled.labels], ())
    copies = [trained() for _ in range(2)]
    deltas = [distill_cuts(m, d, WordHashTokenizer(64), config, recipe=Recipe(nested=cuts)).delta
              for m, d in zip(copies, (unlabelled, flipped))]
    assert all(torch.equal(deltas[0][n], deltas[1][n]) for n in deltas[0])


def test_server_distillation_refuses_what_it_cannot_distil() -> None:
    dims = adapter_for(tiny_model(0)).dims(tiny_model(0).config)
    cuts = (ElasticSpec.uniform(dims, heads=2, ffn=128),)
    config = LocalConfig(batch_size=8, seq_len=16, local_steps=2)
    with pytest.raises(ValueError, match="no nested cuts"):
        distill_cuts(tiny_model(0), toy_data(8), WordHashTokenizer(64), config, recipe=Recipe())
    with pytest.raises(ValueError, match="empty"):
        distill_cuts(tiny_model(0), toy_data(0), WordHashTokenizer(64), config, recipe=Recipe(nested=cuts))
    with pytest.raises(ValueError, match="local_steps >= 1"):
        distill_cuts(tiny_model(0), toy_data(8), WordHashTokenizer(64), LocalConfig(), recipe=Recipe(nested=cuts))
    with pytest.raises(ValueError, match="names tensors the state does not have"):
        with_delta({"a": torch.zeros(2)}, {"b": torch.ones(2)})


def test_sentence_pairs_are_tokenized_as_two_segments_and_train() -> None:
    from transformers import AutoTokenizer

    from raffm.models import default_model_path
    from raffm.training import batches

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    data = TextDataset(["a cat sat", "rain"], [1, 0], ("no", "yes"), pairs=["a cat was sitting", "sun"])
    batch = next(batches(data, tokenizer, 2, 32, shuffle=False))
    sep = tokenizer.sep_token_id
    assert [int((row == sep).sum()) for row in batch["input_ids"]] == [2, 2]  # [CLS] a [SEP] b [SEP]
    segments = batch["token_type_ids"][0][batch["attention_mask"][0].bool()]
    assert segments.tolist() == [0] * 5 + [1] * 5  # "a cat sat" (+ CLS, SEP) / "a cat was sitting" (+ SEP)
    single = next(batches(TextDataset(data.texts, data.labels, data.label_names), tokenizer, 2, 32, shuffle=False))
    assert "token_type_ids" not in single
    model = tiny_model(0, vocab_size=tokenizer.vocab_size)
    result = train_local(model, data, tokenizer, LocalConfig(batch_size=2, seq_len=32, lr=1e-3, local_steps=2))
    assert result.delta["bert.embeddings.token_type_embeddings.weight"][1].abs().sum() > 0  # segment B trained
