"""Inference scaling: cut sub-models of several sizes from one global model and measure each, with no retraining."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedModel

from raffm.costs import CostModel
from raffm.elastic import extract
from raffm.fitting import ladder
from raffm.report import ScalingPoint
from raffm.spec import ElasticSpec
from raffm.training import Dataset, Tokenizer, evaluate

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def spec_for_fraction(cost_model: CostModel, fraction: float) -> ElasticSpec:
    """The largest ladder rung keeping at most ``fraction`` of the global parameters (the smallest rung if none)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction is {fraction}; it must be in (0, 1]")
    full = ElasticSpec.full(cost_model.dims)
    budget = fraction * cost_model.params(full)
    rungs = ladder(cost_model.dims, shrink_depth=True)
    fitting = [s for s in rungs if cost_model.params(s) <= budget]
    return fitting[-1] if fitting else rungs[0]


def scaling_table(
    model: PreTrainedModel,
    data: Dataset,
    tokenizer: Tokenizer | None,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seq_len: int = 64,
) -> list[ScalingPoint]:
    """Accuracy on ``data`` of the sub-model at every size in ``fractions`` (``model`` must be salience-ordered)."""
    cost_model = CostModel.from_model(model)
    total = cost_model.params(ElasticSpec.full(cost_model.dims))
    points = []
    for fraction in fractions:
        spec = spec_for_fraction(cost_model, fraction)
        params = cost_model.params(spec)
        accuracy = evaluate(extract(model, spec), data, tokenizer, seq_len=seq_len)
        points.append(ScalingPoint(fraction, params / total, params, accuracy, spec.key()))
    return points
