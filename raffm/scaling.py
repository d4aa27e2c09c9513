"""Inference scaling: cut sub-models of several sizes from one global model and measure each, with no retraining.

Sizes are shares of the model's forward compute (FLOPs per sample): cuts keep the full hidden width and the
vocabulary, so their share of the parameters is larger than their share of the compute; both are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from raffm.arch import FFN_KINDS, HEAD_KINDS, adapter_for
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
    each cut is also scored matched to the full model on it (:class:`CutMatcher`). Fractions that land on the same
    rung of the ladder share one evaluation.
    """
    cost_model = CostModel.from_model(model)
    full = ElasticSpec.full(cost_model.dims)
    total = cost_model.params(full)
    measure = score or (lambda cut: evaluate(cut, data, tokenizer, seq_len=seq_len))
    matcher = None if unlabelled is None else CutMatcher(model, unlabelled, tokenizer, seq_len=seq_len)
    scored: dict[str, tuple[float, float | None]] = {}
    points = []
    for fraction in fractions:
        spec = spec_for_fraction(cost_model, fraction, seq_len=seq_len)
        params = cost_model.params(spec)
        if spec.key() not in scored:
            cut = extract(model, spec)
            accuracy = measure(cut)
            matched = None if matcher is None else accuracy  # the full model is what the cuts are matched to
            if matcher is not None and spec != full:
                matcher(cut)
                matched = measure(cut)
            scored[spec.key()] = accuracy, matched
        accuracy, matched = scored[spec.key()]
        points.append(ScalingPoint(fraction, params / total, params, accuracy, spec.key(),
                                   flops_fraction(cost_model, spec, seq_len=seq_len), matched))
    return points


@torch.no_grad()
def fidelity(
    model: PreTrainedModel, cut: PreTrainedModel, data: Dataset, tokenizer: Tokenizer | None, *, seq_len: int = 64,
    max_examples: int = 256,
) -> dict[str, float]:
    """How closely ``cut`` (of ``model``) computes the model's function on ``data``: the mean cosine similarity of
    the last hidden state (first token) and the share of examples whose predicted class agrees with the model's."""
    cosines: list[torch.Tensor] = []
    agree = seen = 0
    with _evaluating(model), _evaluating(cut):
        for batch in batches(data, tokenizer, 64, seq_len, shuffle=False):
            if seen >= max_examples:
                break
            batch.pop("labels")
            full, own = (m(**batch, output_hidden_states=True) for m in (model, cut))
            mine = own.hidden_states[-1][:, 0]  # against the full model's leading channels, if the cut is narrower
            cosines.append(torch.cosine_similarity(full.hidden_states[-1][:, 0, : mine.shape[-1]], mine, dim=-1))
            agree += int((full.logits.argmax(-1) == own.logits.argmax(-1)).sum())
            seen += len(cosines[-1])
    return {"hidden_cosine": float(torch.cat(cosines).mean()), "prediction_agreement": agree / seen}


class _Stop(Exception):
    """Ends a forward pass once a hook has what it needs."""


class CutMatcher:
    """Refits a cut, without labels, to compute what ``full`` computes on ``data`` (labels are never read).

    Layer by layer, every projection that writes into the residual stream (the attention output, the FFN's output
    projection) is refitted by ridge regression from what the already refitted layers below feed it, so that the
    residual sum after it (what the next normalization reads) is the full model's. Where no residual sum follows a
    projection directly (GPT-NeoX's parallel attention) it is fitted to the full model's projection output instead.
    The penalty pulls each weight toward its trained value. This is the layer-wise reconstruction of post-training
    pruning (Kwon et al., 2022) applied to RaFFM's nested cuts: a cut drops heads and neurons whose contribution the
    full model's later layers expect, and refitting the few matrices that write into the residual stream puts most of
    it back: forward passes over (at most ``max_examples``) unlabelled inputs, not retraining. The full model's side
    is computed once, for every cut matched, and held at half precision: two rows of the hidden width per layer and
    real token (for MiniLM and a thousand reviews at 48 tokens, 234 MiB).
    """

    def __init__(self, full: PreTrainedModel, data: Dataset, tokenizer: Tokenizer | None, *, seq_len: int = 64,
                 batch_size: int = 64, max_examples: int = 1000, penalty: float = 1e-2) -> None:
        if len(data) < 10:
            raise ValueError(f"matching a cut needs at least 10 unlabelled examples; got {len(data)}")
        if len(data) > max_examples:
            data = data.subset(range(max_examples))
        self.penalty = penalty
        self.batches = [{k: v for k, v in b.items() if k != "labels"}
                        for b in batches(data, tokenizer, batch_size, seq_len, shuffle=False)]
        self.projections = residual_projections(full)
        with _evaluating(full):
            self.sums = {name: _sums_after(full, name, self.batches[0]) for name in self.projections}
            self.targets = _targets(full, self.projections, self.sums, self.batches)

    def __call__(self, cut: PreTrainedModel) -> None:
        """Refit ``cut``'s residual projections in place (its other tensors are not changed)."""
        with _evaluating(cut):
            for name in self.projections:
                self._refit(cut, name)

    @torch.no_grad()
    def _refit(self, cut: PreTrainedModel, name: str) -> None:
        module = cut.get_submodule(name)
        stored, bias = cast(torch.Tensor, module.weight), cast(torch.Tensor | None, module.bias)
        weight = stored.T if isinstance(module, Conv1D) else stored  # [out, in]
        outputs, inputs = weight.shape
        columns = inputs + (bias is not None)
        gram = torch.zeros(columns, columns, dtype=torch.float64)
        cross = torch.zeros(columns, outputs, dtype=torch.float64)
        for batch, full in zip(self.batches, self.targets[name]):
            own = _capture(cut, name, batch, self.sums[name])
            target = full[:, :outputs].float()  # the leading hidden channels where the cut is narrower
            if self.sums[name]:
                target = target - _tokens(own["sum"] - own["output"], batch)
            x = _tokens(own["input"], batch)
            if bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1)], 1)
            gram += (x.T @ x).double()
            cross += (x.T @ target).double()
        ridge = torch.zeros(columns, dtype=torch.float64)
        ridge[:inputs] = self.penalty * gram.diagonal()[:inputs].mean()
        prior = weight.T if bias is None else torch.cat([weight.T, bias[None]])
        solution = torch.linalg.solve(gram + torch.diag(ridge), cross + ridge[:, None] * prior.double()).float()
        stored.copy_(solution[:inputs] if isinstance(module, Conv1D) else solution[:inputs].T)
        if bias is not None:
            bias.copy_(solution[inputs])


@contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def _sums_after(model: PreTrainedModel, name: str, batch: dict[str, torch.Tensor]) -> bool:
    """Whether the next normalization after projection ``name`` reads a sum that its output is part of: moving the
    output moves what the normalization reads by exactly as much."""
    batch = {k: v[:2] for k, v in batch.items()}
    plain = _capture(model, name, batch, True)
    if "sum" not in plain:
        return False
    moved = _capture(model, name, batch, True, shift=1.0)
    return torch.allclose(moved["sum"] - plain["sum"], torch.ones_like(plain["sum"]), atol=1e-3)


@torch.no_grad()
def _targets(model: PreTrainedModel, names: list[str], sums: dict[str, bool],
             batches: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Per projection and batch, the real tokens' rows (float16) of what the cut should reproduce: the sum the next
    normalization reads (``sums[name]``) or else the projection's output, from one pass of ``model`` per batch."""
    found: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    pending: list[tuple[str, torch.Size]] = []
    batch: dict[str, torch.Tensor] = {}

    def keep(name: str, values: torch.Tensor) -> None:
        found[name].append(_tokens(values, batch).half())

    def projection(name: str) -> Callable[..., None]:
        return lambda _module, _args, output: pending.append((name, output.shape)) if sums[name] else keep(name, output)

    def norm(_module: Any, args: tuple[Any, ...]) -> None:
        while pending and args:
            name, shape = pending.pop()
            keep(name, args[0].reshape(shape))

    hooks = [model.get_submodule(name).register_forward_hook(projection(name)) for name in names]
    hooks += [m.register_forward_pre_hook(norm) for m in _normalizations(model)]
    try:
        for batch in batches:
            model(**batch)
            pending.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return found


def residual_projections(model: PreTrainedModel) -> list[str]:
    """The modules of ``model``'s layers that write into the residual stream, in the order they run: their weight's
    output axis is the hidden width and its input axis heads or FFN neurons (BERT's ``attention.output.dense`` and
    ``output.dense``, Llama's ``o_proj`` and ``down_proj``)."""
    adapter = adapter_for(model)
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or adapter.layer_of(name + ".weight") is None:
            continue
        try:
            axes = [a.kind for a in adapter.layout(name + ".weight")]
        except ValueError:
            continue
        out, into = axes[::-1] if isinstance(module, Conv1D) else axes
        if out == "hidden" and into in (*HEAD_KINDS, *FFN_KINDS):
            found.append(name)
    return sorted(found, key=lambda n: adapter.layer_of(n + ".weight") or 0)  # stable: registration order within


def _capture(model: PreTrainedModel, name: str, batch: dict[str, torch.Tensor], sums: bool,
             shift: float = 0.0) -> dict[str, torch.Tensor]:
    """What projection ``name`` reads (``input``) and writes (``output``) on ``batch`` and, with ``sums``, what the next
    normalization reads after it (``sum``; missing where none follows); ``shift`` is added to the output."""
    got: dict[str, torch.Tensor] = {}

    def projection(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        got["input"], got["output"] = args[0], output + shift
        if not sums:
            raise _Stop
        return got["output"]

    def norm(_module: Any, args: tuple[Any, ...]) -> None:
        if "output" in got and args:
            if args[0].numel() == got["output"].numel():  # (OPT normalizes its tokens flattened)
                got["sum"] = args[0].reshape(got["output"].shape)
            raise _Stop

    hooks = [model.get_submodule(name).register_forward_hook(projection)]
    if sums:
        hooks += [m.register_forward_pre_hook(norm) for m in _normalizations(model)]
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return got


def _normalizations(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The normalization modules of ``model`` (LayerNorm, RMSNorm, ... by their class names)."""
    return [m for m in model.modules() if "norm" in type(m).__name__.lower()]


def _tokens(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``values`` ``[B, T, C]`` (or flattened, ``[B * T, C]``) as float32 rows of the real tokens (padding left out)."""
    rows = values.reshape(-1, values.shape[-1])
    mask = batch.get("attention_mask")
    if mask is not None and mask.numel() == len(rows):
        return rows[mask.reshape(-1).bool()].float()
    return rows.float()
