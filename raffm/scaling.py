"""Inference scaling: cut sub-models of several sizes from one global model and measure each, with no retraining.

Sizes are shares of the model's forward compute (FLOPs per sample): cuts keep the full hidden width and the
vocabulary, so their share of the parameters is larger than their share of the compute; both are reported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from raffm.arch import FFN_KINDS, HEAD_KINDS, adapter_for, canonical_shapes, layer_modules
from raffm.costs import CostModel
from raffm.elastic import extract
from raffm.fitting import ladder
from raffm.report import ScalingPoint
from raffm.slicing import SlicePlan, TensorSlice, slice_plan
from raffm.spec import ElasticSpec
from raffm.threshold import fit_threshold
from raffm.training import Dataset, Tokenizer, batches, evaluate

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
MATCH_MIN_EXAMPLES = 10  # the fewest unlabelled inputs a cut is matched on


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
    prior: torch.Tensor | None = None,
) -> list[ScalingPoint]:
    """Accuracy on ``data`` of the cut at every share of compute in ``fractions`` (``model``: salience-ordered).

    ``score(cut)`` replaces the classification accuracy (e.g. a causal LM's exact match). With ``unlabelled`` data,
    each cut is also scored matched to the full model on it (:class:`CutMatcher`), and with a classifier's label
    ``prior`` too, served: matched, with its threshold at the prior (:func:`raffm.threshold.fit_threshold` on the
    same inputs), as a deployment serves the full model. Fractions that land on the same rung of the ladder share
    one evaluation.
    """
    if prior is not None and unlabelled is None:
        raise ValueError("serving the cuts at a label prior needs the unlabelled inputs their threshold is fitted on")
    cost_model = CostModel.from_model(model)
    full = ElasticSpec.full(cost_model.dims)
    total = cost_model.params(full)
    measure = score or (lambda cut: evaluate(cut, data, tokenizer, seq_len=seq_len))
    matcher = None if unlabelled is None else CutMatcher(model, unlabelled, tokenizer, seq_len=seq_len)
    scored: dict[str, tuple[float, float | None, float | None]] = {}
    points = []
    for fraction in fractions:
        spec = spec_for_fraction(cost_model, fraction, seq_len=seq_len)
        params = cost_model.params(spec)
        if spec.key() not in scored:
            cut = extract(model, spec)
            accuracy = measure(cut)
            matched = served = None
            if matcher is not None:
                matched = accuracy  # the full model is what the cuts are matched to
                if spec != full:
                    matcher(cut)
                    matched = measure(cut)
            if prior is not None and unlabelled is not None:
                fit_threshold(cut, unlabelled, tokenizer, prior, seq_len=seq_len)
                served = measure(cut)
            scored[spec.key()] = accuracy, matched, served
        accuracy, matched, served = scored[spec.key()]
        points.append(ScalingPoint(fraction, params / total, params, accuracy, spec.key(),
                                   flops_fraction(cost_model, spec, seq_len=seq_len), matched, served))
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


# Where a pass of a cut starts: the layers it skips and, for one batch, what the last of them outputs. A cut is refitted
# layer by layer, so a layer below the one being refitted no longer changes: each is run once more, not once per pass.
_Start = tuple[Sequence[torch.nn.Module], Any]


class CutMatcher:
    """Refits a cut, without labels, to compute what ``full`` computes on ``data`` (labels are never read).

    Layer by layer, in the order they run, every projection between the residual stream and the heads or FFN neurons
    is refitted by ridge regression from what the already refitted layers below feed it: those that write into the
    residual stream (the attention output, the FFN's output projection) so that the residual sum after it (what the
    next normalization reads) is the full model's, or where no residual sum follows directly (GPT-NeoX's parallel
    attention) their output; those that read it (query, key, value, the FFN's input projections) so that the heads
    and neurons the cut keeps see what they see in the full model. The penalty pulls each weight toward its trained
    value. This is the layer-wise reconstruction of post-training pruning (Kwon et al., 2022) applied to RaFFM's
    nested cuts: a cut drops heads and neurons whose contribution the full model's later layers expect, and refitting
    the matrices around them puts most of it back: forward passes over (at most ``max_examples``) unlabelled inputs,
    not retraining. The full model's side is computed once, for every cut matched, and held at half precision: the
    residual sums and the projections' inputs, about four rows of the hidden width per layer and real token (for
    MiniLM and a thousand reviews at 48 tokens, about 470 MiB). On the cut's side, a layer whose projections are
    refitted is run once more and its output kept (one row of the hidden width per token) and replayed: the passes
    for the layers above start there.
    """

    def __init__(self, full: PreTrainedModel, data: Dataset, tokenizer: Tokenizer | None, *, seq_len: int = 64,
                 batch_size: int = 64, max_examples: int = 1000, penalty: float = 1e-2) -> None:
        if len(data) < MATCH_MIN_EXAMPLES:
            raise ValueError(f"matching a cut needs at least {MATCH_MIN_EXAMPLES} unlabelled examples; got {len(data)}")
        if len(data) > max_examples:
            data = data.subset(range(max_examples))
        self.penalty = penalty
        self.batches = [{k: v for k, v in b.items() if k != "labels"}
                        for b in batches(data, tokenizer, batch_size, seq_len, shuffle=False)]
        self.adapter = adapter_for(full)
        self.dims, self.shapes = self.adapter.dims(full.config), canonical_shapes(full)
        residual = residual_projections(full)
        with _evaluating(full):
            self.sums = {name: _sums_after(full, name, self.batches[0]) for name in residual}
            self.steps = _steps(full, residual, input_projections(full), self.batches[0])
            self.targets = _targets(full, self.steps, self.sums, self.batches)
        self.weights = {name: _weight(full.get_submodule(name)) for step in self.steps for name in step
                        if name not in self.sums}

    def __call__(self, cut: PreTrainedModel) -> None:
        """Refit ``cut`` (:func:`raffm.elastic.extract` of the full model) in place: only its projections change."""
        if getattr(cut.config, "raffm_spec", None) is None:
            raise ValueError("CutMatcher refits a cut made by raffm.elastic.extract from the full model; this model "
                             "is not one (its config has no raffm_spec)")
        plan = slice_plan(self.adapter, self.dims, ElasticSpec.from_dict(cut.config.raffm_spec), self.shapes)
        layers = list(layer_modules(cut))
        done = 0  # layers refitted; per batch, where a pass of the cut starts:
        starts: list[_Start | None] = [None for _ in self.batches]
        with _evaluating(cut):
            for step in self.steps:
                while done < _layer(cut, step[0]):  # the layers below are refitted: later passes skip them
                    done += 1
                    starts = [_start(cut, layers[:done], batch, start) for batch, start in zip(self.batches, starts)]
                if step[0] in self.sums:
                    self._refit(cut, step[0], starts)
                else:
                    self._refit_readers(cut, step, plan, starts)

    @torch.no_grad()
    def _refit(self, cut: PreTrainedModel, name: str, starts: list[_Start | None]) -> None:
        """Refit projection ``name``, which writes into the residual stream."""
        module = cut.get_submodule(name)
        outputs = cast(torch.Tensor, module.weight).shape[-1 if isinstance(module, Conv1D) else 0]
        gram = cross = torch.tensor(0.0, dtype=torch.float64)  # (sums over the batches)
        for batch, full, start in zip(self.batches, self.targets[name], starts):
            own = _capture(cut, name, batch, self.sums[name], start=start)
            target = full[:, :outputs].float()  # the leading hidden channels where the cut is narrower
            if self.sums[name]:
                target = target - _tokens(own["sum"] - own["output"], batch)
            x = _with_ones(_tokens(own["input"], batch))
            gram, cross = gram + (x.T @ x).double(), cross + (x.T @ target).double()
        self._solve(module, gram, cross)

    @torch.no_grad()
    def _refit_readers(self, cut: PreTrainedModel, names: list[str], plan: SlicePlan,
                       starts: list[_Start | None]) -> None:
        """Refit projections ``names``, which read the same input (from the residual stream), so that each outputs
        what the full model's does on the channels the cut keeps. The full model's outputs are its weights applied
        to its inputs, so one pass over the data serves them all."""
        gram = cross = torch.tensor(0.0, dtype=torch.float64)  # (sums over the batches)
        for batch, full, start in zip(self.batches, self.targets[names[0]], starts):
            x = _with_ones(_tokens(_capture(cut, names[0], batch, False, start=start)["input"], batch))
            gram, cross = gram + (x.T @ x).double(), cross + (x.T @ full.float()).double()
        for name in names:
            weight, bias = self.weights[name]
            rows = _kept_rows(plan[name + ".weight"], weight.shape, isinstance(cut.get_submodule(name), Conv1D))
            target = cross @ weight[rows].T.double()  # x' (X_full W^T + b): the full model's outputs, kept rows
            if bias is not None:
                target += gram[:, -1:] * bias[rows].double()  # (the ones column of x sums the rows)
            self._solve(cut.get_submodule(name), gram, target)

    def _solve(self, module: torch.nn.Module, gram: torch.Tensor, cross: torch.Tensor) -> None:
        """Set ``module``'s weight (and bias) to the ridge solution of ``gram`` / ``cross`` (their last row and
        column: the bias), pulled toward its present weight."""
        stored, bias = cast(torch.Tensor, module.weight), cast(torch.Tensor | None, module.bias)
        weight = _weight(module)[0]
        inputs = weight.shape[1]
        if bias is None:
            gram, cross = gram[:inputs, :inputs], cross[:inputs]
        ridge = torch.zeros(len(gram), dtype=torch.float64)
        ridge[:inputs] = self.penalty * gram.diagonal()[:inputs].mean()
        prior = weight.T if bias is None else torch.cat([weight.T, bias[None]])
        solution = torch.linalg.solve(gram + torch.diag(ridge), cross + ridge[:, None] * prior.double()).float()
        stored.copy_(solution[:inputs] if isinstance(module, Conv1D) else solution[:inputs].T)
        if bias is not None:
            bias.copy_(solution[inputs])


def _weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as ``[out, in]`` (GPT-2's Conv1D stores ``[in, out]``) and its bias (a copy of each)."""
    weight = cast(torch.Tensor, module.weight)
    bias = cast(torch.Tensor | None, module.bias)
    return (weight.T if isinstance(module, Conv1D) else weight).detach().clone(), (
        None if bias is None else bias.detach().clone())


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1)], 1)


def _kept_rows(where: TensorSlice, shape: torch.Size, conv1d: bool) -> torch.Tensor:
    """The full model's output channels (rows of the ``[out, in]`` ``shape``) that a cut's projection keeps."""
    rows = torch.arange(shape[0], dtype=torch.float32)
    grid = (rows[None, :].expand(shape[1], shape[0]) if conv1d else rows[:, None].expand(shape)).contiguous()
    kept = where.take(grid)
    return (kept[0] if conv1d else kept[:, 0]).long()


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
def _steps(model: PreTrainedModel, residual: list[str], readers: list[str],
           batch: dict[str, torch.Tensor]) -> list[list[str]]:
    """The order of refitting: every projection in the order the layers run them, the ones that read the residual
    stream grouped where they read the very same input (query, key and value; a gated FFN's gate and input)."""
    inputs: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], _output: torch.Tensor) -> None:
            inputs.setdefault(name, args[0])
        return hook

    _run(model, {k: v[:2] for k, v in batch.items()}, {name: record(name) for name in readers})
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    steps: list[list[str]] = []
    for name in sorted(residual + readers, key=lambda n: (_layer(model, n), order[n])):
        last = steps[-1] if steps else []
        if name in inputs and last and last[0] in inputs and inputs[last[0]] is inputs[name]:
            last.append(name)
        else:
            steps.append([name])
    return steps


@torch.no_grad()
def _targets(model: PreTrainedModel, steps: list[list[str]], sums: dict[str, bool],
             batches: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Per step and batch, the real tokens' rows (float16) of what the cut should reproduce, from one pass of
    ``model`` per batch: for a projection that writes into the residual stream, the sum the next normalization reads
    (``sums[name]``) or else its output; for projections that read it, their input."""
    found: dict[str, list[torch.Tensor]] = {step[0]: [] for step in steps}
    pending: list[tuple[str, torch.Size]] = []
    seen: set[str] = set()  # (a projection can run twice in a pass: DeBERTa's query on the position embeddings)
    batch: dict[str, torch.Tensor] = {}

    def keep(name: str, values: torch.Tensor) -> None:
        found[name].append(_tokens(values, batch).half())

    def projection(name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if name in seen:
                return
            seen.add(name)
            if name not in sums:
                keep(name, args[0])
            elif sums[name]:
                pending.append((name, output.shape))
            else:
                keep(name, output)
        return hook

    def norm(_module: Any, args: tuple[Any, ...]) -> None:
        while pending and args:
            name, shape = pending.pop()
            keep(name, args[0].reshape(shape))

    for batch in batches:
        seen.clear()
        _run(model, batch, {step[0]: projection(step[0]) for step in steps}, norm)
        pending.clear()
    return found


def _run(model: PreTrainedModel, batch: dict[str, torch.Tensor], hooks: dict[str, Callable[..., Any]],
         norm: Callable[..., Any] | None = None, start: _Start | None = None) -> None:
    """One forward pass of ``model`` with ``hooks`` on the named modules (and ``norm`` before every normalization),
    from ``start``; a hook may end the pass early by raising :class:`_Stop`."""
    handles = [model.get_submodule(name).register_forward_hook(hook) for name, hook in hooks.items()]
    if norm is not None:
        handles += [m.register_forward_pre_hook(norm) for m in _normalizations(model)]
    skipped, output = start or ((), None)
    for layer in skipped:  # (an instance's forward shadows its class's; the last skipped layer's output is a copy)
        layer.forward = functools.partial(_replay, output, layer is skipped[-1])
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for layer in skipped:
            del layer.forward


def _replay(output: Any, copy: bool, *_args: Any, **_kwargs: Any) -> Any:
    """A skipped layer's forward: ``output`` (tensors copied with ``copy``, should the next layer change them)."""
    if copy and isinstance(output, torch.Tensor):
        return output.clone()
    if copy and isinstance(output, tuple):
        return tuple(_replay(o, True) for o in output)
    return output


@torch.no_grad()
def _start(model: PreTrainedModel, layers: Sequence[torch.nn.Module], batch: dict[str, torch.Tensor],
           start: _Start | None) -> _Start:
    """Where a pass of ``model`` starts once ``layers`` (the first of its layers) are refitted: what the last of them
    outputs on ``batch``, from ``start``."""
    got: list[Any] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        got.append(output)
        raise _Stop

    handle = layers[-1].register_forward_hook(keep)
    try:
        _run(model, batch, {}, start=start)
    finally:
        handle.remove()
    return layers, got[0]


def _projections(model: PreTrainedModel) -> Iterator[tuple[str, str, str]]:
    """Each linear module of ``model``'s layers with its weight's output and input axis kinds."""
    adapter = adapter_for(model)
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or adapter.layer_of(name + ".weight") is None:
            continue
        try:
            axes = [a.kind for a in adapter.layout(name + ".weight")]
        except ValueError:
            continue
        out, into = axes[::-1] if isinstance(module, Conv1D) else axes
        yield name, out, into


def _layer(model: PreTrainedModel, name: str) -> int:
    return adapter_for(model).layer_of(name + ".weight") or 0


def residual_projections(model: PreTrainedModel) -> list[str]:
    """The modules of ``model``'s layers that write into the residual stream, in the order they run: their weight's
    output axis is the hidden width and its input axis heads or FFN neurons (BERT's ``attention.output.dense`` and
    ``output.dense``, Llama's ``o_proj`` and ``down_proj``)."""
    found = [name for name, out, into in _projections(model)
             if out == "hidden" and into in (*HEAD_KINDS, *FFN_KINDS)]
    return sorted(found, key=lambda n: _layer(model, n))  # stable: registration order within a layer


def input_projections(model: PreTrainedModel) -> list[str]:
    """The modules of ``model``'s layers that read the residual stream into heads or FFN neurons, in the order they
    run (BERT's query, key, value and ``intermediate.dense``; Llama's ``q/k/v_proj``, ``gate_proj``, ``up_proj``)."""
    found = [name for name, out, into in _projections(model)
             if into == "hidden" and out in (*HEAD_KINDS, *FFN_KINDS)]
    return sorted(found, key=lambda n: _layer(model, n))


def _capture(model: PreTrainedModel, name: str, batch: dict[str, torch.Tensor], sums: bool,
             shift: float = 0.0, start: _Start | None = None) -> dict[str, torch.Tensor]:
    """What projection ``name`` reads (``input``) and writes (``output``) on ``batch`` (from ``start``) and, with
    ``sums``, what the next normalization reads after it (``sum``; missing where none follows); ``shift`` is added to
    the output."""
    got: dict[str, torch.Tensor] = {}

    def projection(_module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if "output" in got:  # (a second run in the same pass)
            return output
        got["input"], got["output"] = args[0], output + shift
        if not sums:
            raise _Stop
        return got["output"]

    def norm(_module: Any, args: tuple[Any, ...]) -> None:
        if "output" in got and args:
            if args[0].numel() == got["output"].numel():  # (OPT normalizes its tokens flattened)
                got["sum"] = args[0].reshape(got["output"].shape)
            raise _Stop

    _run(model, batch, {name: projection}, norm if sums else None, start)
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
