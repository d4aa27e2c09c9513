"""Inference scaling: cut sub-models of several sizes from one global model and measure each, with no retraining.

Sizes are shares of the model's forward compute (FLOPs per sample): cuts keep the full hidden width and the
vocabulary, so their share of the parameters is larger than their share of the compute; both are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

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
    unlabelled: Dataset | None = None,
) -> list[ScalingPoint]:
    """Accuracy on ``data`` of the cut at every share of compute in ``fractions`` (``model``: salience-ordered).

    ``score(cut)`` replaces the classification accuracy (e.g. a causal LM's exact match). With ``unlabelled`` data,
    each cut is also scored with its head matched to the full model on it (:class:`HeadMatcher`). Fractions that land
    on the same rung of the ladder share one evaluation.
    """
    if unlabelled is not None and score is not None:
        raise ValueError("head matching is for classifiers; a custom score cannot be matched")
    cost_model = CostModel.from_model(model)
    full = ElasticSpec.full(cost_model.dims)
    total = cost_model.params(full)
    measure = score or (lambda cut: evaluate(cut, data, tokenizer, seq_len=seq_len))
    matcher = None if unlabelled is None else HeadMatcher(model, unlabelled, tokenizer, seq_len=seq_len)
    scored: dict[str, tuple[float, float | None]] = {}
    points = []
    for fraction in fractions:
        spec = spec_for_fraction(cost_model, fraction, seq_len=seq_len)
        params = cost_model.params(spec)
        if spec.key() not in scored:
            cut = extract(model, spec)
            accuracy = measure(cut)
            matched = None if matcher is None else accuracy  # the full model keeps its own head
            if matcher is not None and spec != full:
                cut.load_state_dict(matcher(cut), strict=False)
                matched = measure(cut)
            scored[spec.key()] = accuracy, matched
        accuracy, matched = scored[spec.key()]
        points.append(ScalingPoint(fraction, params / total, params, accuracy, spec.key(),
                                   flops_fraction(cost_model, spec, seq_len=seq_len), matched))
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


def head_layer(model: PreTrainedModel) -> tuple[str, torch.nn.Linear]:
    """The name and module of the task head's last linear layer, the one that outputs the labels (BERT's and ViT's
    ``classifier``, RoBERTa's ``classifier.out_proj``)."""
    prefix, labels = model.base_model_prefix + ".", model.config.num_labels
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module.out_features == labels and not name.startswith(prefix)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no task head with {labels} outputs to match")
    return found[-1]


@torch.no_grad()
def _head_inputs(model: PreTrainedModel, data: Dataset, tokenizer: Tokenizer | None, *, seq_len: int,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the head layer reads (``[N, H]``) and the logits (``[N, labels]``) of ``model`` on ``data``."""
    name, layer = head_layer(model)
    seen: list[torch.Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        logits = [model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                  for batch in batches(data, tokenizer, batch_size, seq_len, shuffle=False)]
    finally:
        hook.remove()
        model.train(was_training)
    if seen[0].dim() != 2:
        raise ValueError(f"{type(model).__name__}'s head layer {name!r} reads every position, not one pooled vector "
                         "per example; only pooled heads (encoders, ViT) can be matched")
    return torch.cat(seen).float(), torch.cat(logits).float()


class HeadMatcher:
    """Refits a cut's head layer, without labels, to predict what ``full`` predicts on ``data`` (its labels are never
    read): a multinomial logistic regression of the cut's pooled features onto the full model's class probabilities,
    its L2 penalty the one of ``penalties`` whose fit on four fifths of ``data`` agrees best with the full model on the
    last fifth. The full model's predictions are computed once, for every cut matched.

    A cut keeps the full model's head, which was trained on the full body's features; a cut body's features are
    shifted, and refitting the one layer that reads them wins back part of what the cut lost (a linear fit on a
    thousand unlabelled inputs: seconds, not retraining)."""

    def __init__(self, full: PreTrainedModel, data: Dataset, tokenizer: Tokenizer | None, *, seq_len: int = 64,
                 batch_size: int = 64, penalties: Sequence[float] = (1e-4, 1e-3, 1e-2)) -> None:
        if len(data) < 10:
            raise ValueError(f"head matching needs at least 10 unlabelled examples; got {len(data)}")
        self.data, self.tokenizer, self.seq_len, self.batch_size = data, tokenizer, seq_len, batch_size
        self.penalties = tuple(penalties)
        _, self.teacher = _head_inputs(full, data, tokenizer, seq_len=seq_len, batch_size=batch_size)

    def __call__(self, cut: PreTrainedModel) -> dict[str, torch.Tensor]:
        """The layer's ``weight`` and ``bias`` by their state names, for ``cut.load_state_dict(..., strict=False)``;
        ``cut`` is not changed."""
        name, _ = head_layer(cut)
        features, _ = _head_inputs(cut, self.data, self.tokenizer, seq_len=self.seq_len, batch_size=self.batch_size)
        target = torch.softmax(self.teacher, dim=-1)
        mean, scale = features.mean(0), features.std(0) + 1e-6
        x = (features - mean) / scale
        split = len(x) * 4 // 5

        def agreement(penalty: float) -> float:
            w, b = _fit_softmax(x[:split], target[:split], penalty)
            return float(((x[split:] @ w + b).argmax(-1) == self.teacher[split:].argmax(-1)).float().mean())

        w, b = _fit_softmax(x, target, max(self.penalties, key=agreement))
        # Fold the standardization in: ((f - mean) / scale) @ w + b = f @ (w / scale) + (b - (mean / scale) @ w).
        return {f"{name}.weight": (w / scale[:, None]).T.contiguous(), f"{name}.bias": b - (mean / scale) @ w}


def matched_head(cut: PreTrainedModel, full: PreTrainedModel, data: Dataset, tokenizer: Tokenizer | None,
                 **options: Any) -> dict[str, torch.Tensor]:
    """:class:`HeadMatcher` for one cut: its head layer's ``weight`` and ``bias`` refitted to ``full`` on ``data``."""
    return HeadMatcher(full, data, tokenizer, **options)(cut)


def _fit_softmax(x: torch.Tensor, target: torch.Tensor, penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w, b)`` minimising the soft-target cross-entropy of ``x @ w + b`` plus ``penalty`` times the squared
    weights (L-BFGS from zero)."""
    w = torch.zeros(x.shape[1], target.shape[1], requires_grad=True)
    b = torch.zeros(target.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = -(target * torch.log_softmax(x @ w + b, dim=-1)).sum(-1).mean() + penalty * w.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return w.detach(), b.detach()
