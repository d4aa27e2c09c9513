"""Slicing a global state dict into a sub-model's tensors, and scattering them back.

Every kept block is a *leading* block of a reshaped view of the global tensor. A query weight ``[H*D, hidden]``
is viewed as ``[H, D, hidden]`` and the sub-model keeps ``[:heads, :head_dim, :hidden']``, i.e. the first
``head_dim`` dimensions of each of the first ``heads`` heads (never a global truncation re-split into heads); a fused
query/key/value output ``[3*H*D]`` is viewed as ``[3, H, D]`` and keeps ``[:3, :heads, :head_dim]`` (grouped per
head, GPT-NeoX's: ``[H, 3, D]``, keeping ``[:heads, :3, :head_dim]``).
Because each :class:`TensorSlice` is a tuple of leading slices on a view, taking, scattering and folding are
plain strided tensor operations with no index tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from raffm.arch import FUSED_PARTS, HEAD_PARTS, Adapter, Axis
from raffm.spec import ElasticSpec, ModelDims


@dataclass(frozen=True)
class TensorSlice:
    """Where one sub-model tensor lives inside its global tensor.

    ``view``: the global tensor reshaped so that every kept block is leading; ``keep``: the leading sizes kept
    along each view axis; ``shape``/``sub_shape``: the global and sub-model tensor shapes.
    """

    shape: tuple[int, ...]
    view: tuple[int, ...]
    keep: tuple[int, ...]
    sub_shape: tuple[int, ...]

    @property
    def index(self) -> tuple[slice, ...]:
        return tuple(slice(0, k) for k in self.keep)

    @property
    def numel(self) -> int:
        return math.prod(self.sub_shape)

    def block(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept block of a global-shaped tensor, as a strided view (writes go through to ``tensor``)."""
        return tensor.view(self.view)[self.index]

    def take_view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The kept block shaped like the sub-model tensor: a view where the strides allow, else a copy."""
        return self.block(tensor).reshape(self.sub_shape)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of the kept block, shaped like the sub-model tensor."""
        return self.block(tensor).reshape(self.sub_shape).clone()

    @property
    def prefix_numel(self) -> int:
        """How many leading elements (row-major) of the global tensor hold the whole kept block: a reader of a stored
        tensor needs only that prefix (the kept block's last element is the prefix's last)."""
        if self.numel == 0:
            return 0
        return 1 + sum((k - 1) * s for k, s in zip(self.keep, _row_major_strides(self.view)))

    def take_prefix(self, flat: torch.Tensor) -> torch.Tensor:
        """:meth:`take` from the leading ``prefix_numel`` elements of the global tensor (a 1-D tensor); a full-extent
        slice reuses ``flat`` without a copy."""
        if flat.numel() < self.prefix_numel:
            raise ValueError(f"a prefix of {flat.numel()} elements does not hold this slice ({self.prefix_numel})")
        if self.keep == self.view:
            return flat[: self.numel].reshape(self.sub_shape)
        block = torch.as_strided(flat, self.keep, _row_major_strides(self.view))
        return block.reshape(self.sub_shape).clone()

    def put(self, tensor: torch.Tensor, sub: torch.Tensor) -> None:
        """Write ``sub`` into its place in the global-shaped ``tensor`` (in place)."""
        self.block(tensor).copy_(sub.reshape(self.keep))


SlicePlan = dict[str, TensorSlice]


def _row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return tuple(strides)


def _axis_view(
    axis: Axis, size: int, dims: ModelDims, container: ElasticSpec, spec: ElasticSpec
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(view sizes, kept sizes) for one tensor axis of a ``container``-shaped tensor that ``spec`` cuts."""
    if axis.kind == "hidden":
        return (size,), (spec.hidden,)
    if axis.kind == "full":
        return (size,), (size,)
    assert axis.layer is not None
    layer = spec.layers[axis.layer]
    if axis.kind == "ffn":
        return (size,), (layer.ffn,)
    if axis.kind == "gffn":  # a gated FFN's fused [input | gate] rows: the same leading neurons of each half
        parts = FUSED_PARTS[axis.kind]
        return (parts, size // parts), (parts, layer.ffn)
    outer = container.layers[axis.layer]  # qk / v / kv: [heads, head_dim] of the container
    if axis.kind == "q":  # grouped queries: [kv_heads, group, head_dim]; a cut keeps every query head of a kept group
        return (outer.heads, dims.group, outer.head_dim), (layer.heads, dims.group, layer.head_dim)
    if axis.kind in FUSED_PARTS:  # fused [q | k | v]: the same leading heads of each part
        parts = FUSED_PARTS[axis.kind]
        return (parts, outer.heads, outer.head_dim), (parts, layer.heads, layer.head_dim)
    if axis.kind in HEAD_PARTS:  # fused per head [q_h | k_h | v_h]: the leading heads, each with all its parts
        parts = HEAD_PARTS[axis.kind]
        return (outer.heads, parts, outer.head_dim), (layer.heads, parts, layer.head_dim)
    return (outer.heads, outer.head_dim), (layer.heads, layer.head_dim)


def slice_plan(
    adapter: Adapter,
    dims: ModelDims,
    spec: ElasticSpec,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    within: ElasticSpec | None = None,
) -> SlicePlan:
    """The slice of every tensor the sub-model ``spec`` keeps (tensors of dropped layers are absent).

    ``shapes`` are the global model's tensor shapes, or, with ``within``, the shapes of the sub-model ``within``
    (``spec`` must then be nested in it): the plan of a smaller cut *inside* a sub-model, whose blocks are again
    leading blocks, so a device can train nested cuts on views of its own weights.
    """
    spec.validate(dims)
    container = ElasticSpec.full(dims) if within is None else within.validate(dims)
    if not nested(spec, container):
        raise ValueError(f"spec {spec.key()} is not nested in {container.key()}: every size must be <= its own")
    plan: SlicePlan = {}
    for name, shape in shapes.items():
        layer = adapter.layer_of(name)
        if layer is not None and layer >= spec.depth:
            continue
        axes = adapter.layout(name)
        if len(axes) != len(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(shape)}; the {adapter.name} adapter expects {len(axes)} axes")
        view: list[int] = []
        keep: list[int] = []
        sub_shape: list[int] = []
        for axis, size in zip(axes, shape):
            v, k = _axis_view(axis, size, dims, container, spec)
            if math.prod(v) != size:
                raise ValueError(f"tensor {name!r} axis of size {size} does not match the model's {axis.kind} width")
            view.extend(v)
            keep.extend(k)
            sub_shape.append(math.prod(k))
        plan[name] = TensorSlice(tuple(shape), tuple(view), tuple(keep), tuple(sub_shape))
    return plan


def nested(small: ElasticSpec, big: ElasticSpec) -> bool:
    """True if every size of ``small`` is <= that of ``big`` (layer by layer, and no more layers)."""
    return (
        small.hidden <= big.hidden
        and small.depth <= big.depth
        and all(
            s.heads <= b.heads and s.head_dim <= b.head_dim and s.ffn <= b.ffn for s, b in zip(small.layers, big.layers)
        )
    )


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state.items()}


def slice_state(state: Mapping[str, torch.Tensor], plan: SlicePlan) -> dict[str, torch.Tensor]:
    """The sub-model's tensors: new contiguous tensors, the global state untouched."""
    return {name: s.take(state[name]) for name, s in plan.items()}


def scatter(
    state: Mapping[str, torch.Tensor], sub: Mapping[str, torch.Tensor], plan: SlicePlan
) -> dict[str, torch.Tensor]:
    """A copy of the global ``state`` with the sub-model tensors written back into their places."""
    out = {name: t.clone() for name, t in state.items()}
    for name, tensor in sub.items():
        plan[name].put(out[name], tensor)
    return out


def coverage_mask(tensor_slice: TensorSlice) -> torch.Tensor:
    """A bool tensor of the global shape, True where the sub-model has an element."""
    mask = torch.zeros(tensor_slice.shape, dtype=torch.bool)
    tensor_slice.block(mask).fill_(True)
    return mask
