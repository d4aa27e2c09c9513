"""The serving threshold: offsets that make a classifier predict each label as often as the prior says, on the
unlabelled inputs they were chosen on, folded into its output bias and nowhere else."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from raffm.data import TextDataset
from raffm.threshold import fit_threshold, fleet_prior, label_counts, output_bias, parse_prior, prior_offsets
from raffm.training import batches
from tests.unit.toys import WordHashTokenizer, tiny_model, toy_data


@pytest.mark.parametrize("shift", [-3.0, 0.0, 5.0])
def test_two_labels_get_the_priors_quantile(shift: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(1000, 2) * torch.tensor([1.0, 2.0]) + torch.tensor([0.0, shift])
    offsets = prior_offsets(logits, torch.tensor([0.42, 0.58]))
    margin = logits[:, 1] - logits[:, 0]
    assert ((margin + offsets[1] - offsets[0]) > 0).float().mean().item() == pytest.approx(0.58, abs=2e-3)
    # the margin's quantile at the prior, whatever the model's own bias was
    assert float(offsets[1] - offsets[0]) == pytest.approx(-float(torch.quantile(margin, 0.42)), abs=0.05)


def test_many_labels_get_their_shares() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3000, 4) * 3 + torch.tensor([2.0, 0.0, 0.0, -2.0])
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    offsets = prior_offsets(logits, prior)
    shares = torch.bincount((logits + offsets).argmax(-1), minlength=4).float() / len(logits)
    assert torch.allclose(shares, prior, atol=5e-3)
    assert abs(float(offsets.sum())) < 1e-4


def test_a_prior_is_read_as_shares_or_counts() -> None:
    assert torch.allclose(parse_prior("0.42,0.58", 2), torch.tensor([0.42, 0.58]))
    assert torch.allclose(parse_prior("432, 1255, 313", 3), torch.tensor([0.216, 0.6275, 0.1565]))
    for text, message in [("0.5", "has 1 values; the model has 2 labels"), ("a,b", "one number per label"),
                          ("-1,2", "every value must be >= 0"), ("0,0", "some > 0"), ("nan,1", ">= 0")]:
        with pytest.raises(ValueError, match=message):
            parse_prior(text, 2)


def test_the_fleet_prior_sums_what_devices_reported() -> None:
    counts = label_counts([[3, 1], [1, 0, 4], []])  # devices may know fewer labels than the model has
    assert counts == [4, 1, 4]
    assert fleet_prior(counts).tolist() == [4 / 9, 1 / 9, 4 / 9]
    for nothing in ([], [0, 0]):
        with pytest.raises(ValueError, match="no device reported its label counts"):
            fleet_prior(nothing)


def _share_of_label_1(model: torch.nn.Module, data, tokenizer) -> float:
    with torch.no_grad():
        predicted = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
                               for b in batches(data, tokenizer, 64, 16, shuffle=False)])
    return float(predicted.float().mean())


def test_the_fitted_model_predicts_the_prior_and_only_its_bias_changes() -> None:
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 500, (6,), generator=gen)) for _ in range(400)]
    model, data, tokenizer = tiny_model(0), TextDataset(texts, [0] * 400, ("a", "b")), WordHashTokenizer(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    offsets = fit_threshold(model, data, tokenizer, torch.tensor([0.3, 0.7]), seq_len=16)
    assert _share_of_label_1(model, data, tokenizer) == pytest.approx(0.7, abs=0.01)
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["classifier.bias"]
    assert torch.allclose(after["classifier.bias"] - before["classifier.bias"], offsets)
    # fitting again at the same prior moves nothing: the model already predicts it
    again = fit_threshold(model, data, tokenizer, torch.tensor([0.3, 0.7]), seq_len=16)
    assert _share_of_label_1(model, data, tokenizer) == pytest.approx(0.7, abs=0.01)
    assert float((again[1] - again[0]).abs()) < float((offsets[1] - offsets[0]).abs())


def test_a_prior_given_as_counts_is_read_as_their_shares() -> None:
    # counts (as devices report them) once went in as they were and left the threshold at the inputs' mean logits
    gen = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 500, (6,), generator=gen)) for _ in range(400)]
    data, tokenizer = TextDataset(texts, [0] * 400, ("a", "b")), WordHashTokenizer(64)
    by_counts, by_shares = tiny_model(0), tiny_model(0)
    counts = fit_threshold(by_counts, data, tokenizer, torch.tensor([832, 1168], dtype=torch.float64), seq_len=16)
    shares = fit_threshold(by_shares, data, tokenizer, torch.tensor([0.416, 0.584]), seq_len=16)
    assert torch.allclose(counts, shares)
    assert _share_of_label_1(by_counts, data, tokenizer) == pytest.approx(0.584, abs=0.01)


def test_a_head_without_a_bias_or_a_mismatched_prior_is_refused() -> None:
    config = GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=64, pad_token_id=0)
    with pytest.raises(ValueError, match="classifier has no bias to hold a serving threshold"):
        output_bias(GPT2ForSequenceClassification(config))
    with pytest.raises(ValueError, match="a label prior of 3 values for a classifier of 2 labels"):
        fit_threshold(tiny_model(0), toy_data(20), WordHashTokenizer(64), torch.tensor([0.2, 0.3, 0.5]))
    for bad in ([0.0, 0.0], [-1.0, 2.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="a label prior needs values >= 0, some > 0"):
            fit_threshold(tiny_model(0), toy_data(20), WordHashTokenizer(64), torch.tensor(bad))
    with pytest.raises(ValueError, match="needs unlabelled inputs"):
        fit_threshold(tiny_model(0), toy_data(20).subset([]), WordHashTokenizer(64), torch.tensor([0.5, 0.5]))
