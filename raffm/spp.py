"""Salient parameter prioritization (SPP): reorder channels so the most salient come first.

Every reordering is a permutation applied to all coupled axes at once (declared by the architecture adapter), so
the network computes exactly the same function; only which channels are *leading* changes. Steps, per layer:

1. whole heads (with grouped-query attention: whole KV groups with their query heads), ranked by the L1 mass of
   their Q/K/V rows and attention-output columns;
2. within every head, query/key dimensions ranked by (|q_j|_1 + |k_j|_1) / 2 with ONE permutation shared by W_q
   and W_k (scores are unchanged: x W_q P (x W_k P)^T = x W_q W_k^T x^T);
3. within every head, value dimensions ranked by their V rows plus the matching attention-output columns;
4. feed-forward neurons ranked by their W_in row plus W_out column (SwiGLU: gate row + up row + down column; a
   fused GLU input, ModernBERT's ``Wi`` ``[input | gate]``: both of its rows, one order applied in both halves).
Steps 2 and 3 are skipped for models whose specs keep every head dimension (see :func:`prioritize_state`).
A fused projection (GPT-2's ``c_attn``, ``[q | k | v]``) is ranked and permuted per part: each part is ``[heads,
head_dim]``, a head's score sums its three parts, and one head order is applied inside every part. One fused per
head (GPT-NeoX's ``query_key_value``, ``[heads, 3, head_dim]``) needs nothing more: a head's rows are one contiguous
block, moved as a unit.
The residual (hidden) channels are never reordered: sub-models keep the full hidden width (see raffm.fitting).

Scores come from the weight matrices (L1 norm); biases and vectors follow the permutation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from raffm.arch import FFN_KINDS, FUSED_PARTS, HEAD_KINDS, Adapter, Axis, adapter_for
from raffm.spec import ModelDims

Layouts = dict[str, tuple[Axis, ...]]
ScoreFn = Callable[[torch.Tensor, int], torch.Tensor]
M = TypeVar("M", bound=nn.Module)


def l1_score(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """L1 norm of every slice of ``tensor`` along ``axis``: shape ``[tensor.shape[axis]]``."""
    dims = [d for d in range(tensor.dim()) if d != axis]
    return tensor.detach().abs().sum(dim=dims, dtype=torch.float64)


def _axis_scores(
    state: Mapping[str, torch.Tensor],
    layouts: Layouts,
    matches: Callable[[Axis], bool],
    score: ScoreFn,
    units: int | None = None,
) -> torch.Tensor:
    """The summed score of every index of the matching axes; with ``units``, of every unit (head, KV group or FFN
    neuron) of them: each axis is viewed as ``[parts, units, -1]`` (one part unless fused,
    :data:`raffm.arch.FUSED_PARTS`), so axes of different widths (grouped queries and their KV rows, a fused q/k/v or
    GLU input) add up per unit."""
    total: torch.Tensor | None = None
    for name, axes in layouts.items():
        tensor = state[name]
        if tensor.dim() < 2:
            continue
        for pos, axis in enumerate(axes):
            if matches(axis):
                s = score(tensor, pos)
                if units is not None:
                    s = s.view(FUSED_PARTS.get(axis.kind, 1), units, -1).sum(dim=(0, 2))
                total = s if total is None else total + s
    if total is None:
        raise ValueError("no weight matrix carries this axis; the adapter's rules are incomplete")
    return total


def _apply(
    state: dict[str, torch.Tensor], layouts: Layouts, matches: Callable[[Axis], bool], index: torch.Tensor,
    units: int | None = None,
) -> None:
    """Permute every matching axis by ``index``; with ``units``, ``index`` orders whole units and moves each unit's
    block of contiguous indices together (never permuting inside it), in every part of a fused axis."""
    for name, axes in layouts.items():
        for pos, axis in enumerate(axes):
            if matches(axis):
                flat = index
                if units is not None:
                    parts = FUSED_PARTS.get(axis.kind, 1)
                    part = state[name].shape[pos] // parts
                    block = (index[:, None] * (part // units) + torch.arange(part // units)).reshape(-1)
                    flat = (torch.arange(parts)[:, None] * part + block).reshape(-1)
                state[name] = state[name].index_select(pos, flat)


def _descending(score: torch.Tensor) -> torch.Tensor:
    return torch.argsort(score, dim=-1, descending=True, stable=True)


def prioritize_state(
    state: Mapping[str, torch.Tensor],
    adapter: Adapter,
    dims: ModelDims,
    *,
    score: ScoreFn = l1_score,
) -> dict[str, torch.Tensor]:
    """A salience-ordered copy of ``state`` (the input is not modified).

    With grouped-query attention the units ranked in step 1 are KV groups: a group's score sums its key and value
    rows, the query rows of all its query heads and their attention-output columns. Steps 2 and 3 are skipped where
    specs keep every head dimension (``dims.fixed_head_dim``): the order inside a head then never decides what a cut
    keeps, and with rotary position embeddings, which rotate fixed pairs of a head's dimensions at fixed
    frequencies, or a fused q/k/v projection, whose value dimensions no ``v`` step reaches, permuting them would
    change the function.
    """
    out = dict(state)
    layouts: Layouts = {name: adapter.layout(name) for name in state}
    H, D = dims.heads, dims.head_dim
    for layer in range(dims.layers):
        def heads_of(axis: Axis, layer: int = layer) -> bool:
            return axis.layer == layer and axis.kind in HEAD_KINDS

        head_order = _descending(_axis_scores(out, layouts, heads_of, score, units=H))
        _apply(out, layouts, heads_of, head_order, units=H)

        for kind in () if dims.fixed_head_dim else ("qk", "v"):
            def within(axis: Axis, layer: int = layer, kind: str = kind) -> bool:
                return axis.layer == layer and axis.kind == kind

            dim_order = _descending(_axis_scores(out, layouts, within, score).view(H, D))
            flat = (torch.arange(H)[:, None] * D + dim_order).reshape(-1)
            _apply(out, layouts, within, flat)

        def ffn_of(axis: Axis, layer: int = layer) -> bool:
            return axis.layer == layer and axis.kind in FFN_KINDS

        # units of one neuron each: a fused GLU input's two halves add up per neuron and move together
        ffn_order = _descending(_axis_scores(out, layouts, ffn_of, score, units=dims.ffn))
        _apply(out, layouts, ffn_of, ffn_order, units=dims.ffn)

    return {name: t.contiguous() for name, t in out.items()}


def prioritize(model: M, *, score: ScoreFn = l1_score) -> M:
    """A salience-ordered copy of a ``transformers`` model; the input model is not modified.

    The residual (hidden) channels keep their order: they are never cut, so every output of the model, hidden states
    included, is unchanged.
    """
    adapter = adapter_for(model)
    state = prioritize_state(model.state_dict(), adapter, adapter.dims(model.config), score=score)
    ordered = copy.deepcopy(model)
    ordered.load_state_dict(state)
    return ordered
