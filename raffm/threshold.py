"""A classifier's serving threshold: per-label offsets, folded into its output bias, that make it predict each label
as often as the fleet's data holds it (the label prior), chosen on unlabelled inputs.

Devices train with logit adjustment (:attr:`raffm.strategy.Strategy.prior_correction`), which fits the merged model
for a balanced label distribution, so its own threshold serves no distribution in particular and swings from version
to version (on the default demo, 77 -> 38 -> 14 -> 49% of the reviews called "fresh" where 58% are). Adding the log
prior to the logits would be right for a calibrated model; these are not. Matching the predicted shares instead needs
only the prior and unlabelled inputs, no labels (``bench/results/2026-12-04.md``, "Twenty-sixth session").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from raffm.training import Dataset, Tokenizer, batches


def label_counts(reported: Iterable[Sequence[int]]) -> list[int]:
    """Examples per label id, summed over the ``label_counts`` of their data that devices sent with their updates (or
    over rounds' sums of them): the fleet's label prior as counts, which the server learns without seeing any data.
    Empty when none sent any."""
    total: list[int] = []
    for counts in reported:
        total += [0] * (len(counts) - len(total))
        for i, count in enumerate(counts):
            total[i] += int(count)
    return total


def fleet_prior(counts: Sequence[int]) -> torch.Tensor:
    """The label shares (float64, summing to 1) of ``counts`` (examples per label id, :func:`label_counts`)."""
    prior = torch.tensor(list(counts), dtype=torch.float64)
    if not len(prior) or prior.sum() <= 0:
        raise ValueError("a label prior needs some examples counted; no device reported its label counts")
    return prior / prior.sum()


def parse_prior(text: str, num_labels: int) -> torch.Tensor:
    """``"0.42,0.58"`` or label counts ``"432,1255"`` (label order), as shares (num_labels,) summing to 1."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"label prior {text!r}: give one number per label, comma-separated (shares or counts)"
                         ) from None
    if len(values) != num_labels:
        raise ValueError(f"label prior {text!r} has {len(values)} values; the model has {num_labels} labels")
    prior = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"label prior {text!r}: every value must be >= 0, and some > 0")
    return prior / prior.sum()


def prior_offsets(logits: torch.Tensor, prior: torch.Tensor, iterations: int = 500) -> torch.Tensor:
    """Offsets (K,) that make ``(logits + offsets).argmax(-1)`` over the N inputs of ``logits`` (N, K) pick each
    label about as often as ``prior`` (K,) says (for two labels: the logit margin's quantile at the prior).

    They minimise the convex mean_i max_k (logits_ik + b_k) - prior . b, whose subgradient is each label's predicted
    share less its prior: from the offsets that centre each label's logits, subgradient steps shrinking as 1/sqrt(t),
    scaled to how far apart the inputs' logits are; the offsets whose shares came closest are kept. Centred (they sum
    to 0)."""
    offsets = -logits.mean(0)  # from every label's mean logit at 0; steps as large as the inputs' logits differ
    best, best_gap = offsets.clone(), float("inf")
    scale = float((logits - logits.mean(0)).std()) or 1.0
    for t in range(1, iterations + 1):
        share = torch.bincount((logits + offsets).argmax(-1), minlength=logits.shape[1]).float() / len(logits)
        gap = float((share - prior).abs().sum())
        if gap < best_gap:
            best, best_gap = offsets.clone(), gap
        offsets -= scale / t**0.5 * (share - prior)
    return best - best.mean()


def output_bias(model: nn.Module) -> nn.Parameter:
    """The bias of the classifier's last layer: the last linear layer with one output per label."""
    num_labels = model.config.num_labels  # type: ignore[union-attr]
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not heads:
        raise ValueError(f"{type(model).__name__} has no linear layer with one output per label ({num_labels})")
    if heads[-1].bias is None:
        raise ValueError(f"{type(model).__name__}'s classifier has no bias to hold a serving threshold")
    return heads[-1].bias


@torch.no_grad()
def fit_threshold(model: nn.Module, unlabelled: Dataset, tokenizer: Tokenizer | None, prior: torch.Tensor, *,
                  seq_len: int = 64, max_examples: int = 1000) -> torch.Tensor:
    """Fold into ``model``'s output bias (in place) the offsets that make it predict each label as often as ``prior``
    (shares, or counts: read as their shares) says on (at most ``max_examples`` of) ``unlabelled`` (their labels, if
    any, are not read); returns them."""
    bias = output_bias(model)
    if len(prior) != len(bias):
        raise ValueError(f"a label prior of {len(prior)} values for a classifier of {len(bias)} labels")
    if not torch.isfinite(prior).all() or (prior < 0).any() or prior.sum() <= 0:
        raise ValueError(f"a label prior needs values >= 0, some > 0; got {prior.tolist()}")
    if len(unlabelled) == 0:
        raise ValueError("fitting a serving threshold needs unlabelled inputs; got none")
    if len(unlabelled) > max_examples:
        unlabelled = unlabelled.subset(range(max_examples))
    was_training = model.training
    model.eval()
    logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
                        for b in batches(unlabelled, tokenizer, 64, seq_len, shuffle=False)])
    model.train(was_training)
    offsets = prior_offsets(logits, (prior / prior.sum()).float())
    bias.add_(offsets.to(bias.dtype))
    return offsets
