"""Inference scaling: cut sub-models of several sizes from one global model and measure each, with no retraining.

Sizes are shares of the model's forward compute (FLOPs per sample): cuts keep the full hidden width and the
vocabulary, so their share of the parameters is larger than their share of the compute; both are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from raffm.costs import CostModel
from raffm.elastic import extract
from raffm.fitting import ladder
from raffm.report import ScalingPoint
from raffm.spec import ElasticSpec
from raffm.training import Dataset, Tokenizer, batches, evaluate

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def flops_fraction(cost_model: CostModel, spec: ElasticSpec, *, seq_len: int | None = 64) -> float:
    """The share of the global model's forward FLOPs per sample that ``spec`` keeps."""
    seq = None if cost_model.image_tokens is not None else min(seq_len or 64, cost_model.max_positions)
    full = ElasticSpec.full(cost_model.dims)
    flops = [cost_model.estimate(s, batch_size=1, seq_len=seq).forward_flops_per_sample for s in (spec, full)]
    return flops[0] / flops[1]


def spec_for_fraction(cost_model: CostModel, fraction: float, *, seq_len: int | None = 64) -> ElasticSpec:
    """The ladder rung whose share of the forward compute is closest to ``fraction`` (the smaller one on a tie)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction is {fraction}; it must be in (0, 1]")
    rungs = ladder(cost_model.dims)
    return min(rungs, key=lambda s: abs(flops_fraction(cost_model, s, seq_len=seq_len) - fraction))


def scaling_table(
    model: PreTrainedModel,
    data: Dataset,
    tokenizer: Tokenizer | None,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seq_len: int = 64,
    score: Callable[[torch.nn.Module], float] | None = None,
) -> list[ScalingPoint]:
    """Accuracy on ``data`` of the cut at every share of compute in ``fractions`` (``model``: salience-ordered).

    ``score(cut)`` replaces the classification accuracy (e.g. a causal LM's exact match). Fractions that land on
    the same rung of the ladder share one evaluation.
    """
    cost_model = CostModel.from_model(model)
    total = cost_model.params(ElasticSpec.full(cost_model.dims))
    measure = score or (lambda cut: evaluate(cut, data, tokenizer, seq_len=seq_len))
    scored: dict[str, float] = {}
    points = []
    for fraction in fractions:
        spec = spec_for_fraction(cost_model, fraction, seq_len=seq_len)
        params = cost_model.params(spec)
        if spec.key() not in scored:
            scored[spec.key()] = measure(extract(model, spec))
        points.append(ScalingPoint(fraction, params / total, params, scored[spec.key()], spec.key(),
                                   flops_fraction(cost_model, spec, seq_len=seq_len)))
    return points


@torch.no_grad()
def fidelity(
    model: PreTrainedModel, spec: ElasticSpec, data: Dataset, tokenizer: Tokenizer | None, *, seq_len: int = 64,
    max_examples: int = 256,
) -> dict[str, float]:
    """How closely the cut ``spec`` computes the model's function on ``data``: the mean cosine similarity of the
    last hidden state (first token) and the share of examples whose predicted class agrees with the model's."""
    sub = extract(model, spec).eval()
    was_training = model.training
    model.eval()
    cosines: list[torch.Tensor] = []
    agree = seen = 0
    for batch in batches(data, tokenizer, 64, seq_len, shuffle=False):
        if seen >= max_examples:
            break
        batch.pop("labels")
        full, cut = (m(**batch, output_hidden_states=True) for m in (model, sub))
        cosines.append(torch.cosine_similarity(full.hidden_states[-1][:, 0], cut.hidden_states[-1][:, 0], dim=-1))
        agree += int((full.logits.argmax(-1) == cut.logits.argmax(-1)).sum())
        seen += len(cosines[-1])
    model.train(was_training)
    return {"hidden_cosine": float(torch.cat(cosines).mean()), "prediction_agreement": agree / seen}
