"""Elastic sub-model specifications.

A sub-model keeps, after salience ordering, the *leading* channels of the global model:
the first ``hidden`` residual channels, the first ``len(layers)`` layers, and per layer the first ``heads``
attention heads, the first ``head_dim`` dimensions of every kept head (Q, K and V alike) and the first ``ffn``
feed-forward neurons. With grouped-query attention (Llama family) ``heads`` counts KV groups, each kept with all of
its query heads, and ``head_dim`` is always the full one (rotary position embeddings; see ``ModelDims``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelDims:
    """The shape of a global transformer: what every spec is validated against.

    ``heads`` counts the units a cut keeps or drops: attention heads, or with grouped-query attention (GQA) whole KV
    groups, each of one key/value head and its ``group`` query heads. ``fixed_head_dim``: the head dimension cannot be
    cut (rotary position embeddings rotate fixed pairs of head dimensions at fixed frequencies; DeBERTa scales its
    attention by the kept head size; GPT-2's fused q/k/v projection is cut by whole heads).
    """

    hidden: int
    layers: int
    heads: int
    head_dim: int
    ffn: int
    group: int = 1  # query heads per KV head (1 without GQA)
    fixed_head_dim: bool = False


@dataclass(frozen=True)
class LayerSpec:
    heads: int
    head_dim: int
    ffn: int


@dataclass(frozen=True)
class ElasticSpec:
    hidden: int
    layers: tuple[LayerSpec, ...]

    @property
    def depth(self) -> int:
        return len(self.layers)

    @classmethod
    def full(cls, dims: ModelDims) -> ElasticSpec:
        return cls.uniform(dims, heads=dims.heads, head_dim=dims.head_dim, ffn=dims.ffn)

    @classmethod
    def uniform(
        cls,
        dims: ModelDims,
        *,
        heads: int,
        head_dim: int | None = None,
        ffn: int,
        hidden: int | None = None,
        depth: int | None = None,
    ) -> ElasticSpec:
        """The same width in every layer; unspecified sizes are the global ones."""
        layer = LayerSpec(heads=heads, head_dim=dims.head_dim if head_dim is None else head_dim, ffn=ffn)
        return cls(
            hidden=dims.hidden if hidden is None else hidden,
            layers=(layer,) * (dims.layers if depth is None else depth),
        )

    def validate(self, dims: ModelDims) -> ElasticSpec:
        """Raise ``ValueError`` naming the offending layer and bound; return self when valid."""
        _check_range("hidden", self.hidden, dims.hidden)
        if not 1 <= self.depth <= dims.layers:
            raise ValueError(f"spec has {self.depth} layers; it must have between 1 and {dims.layers}")
        for i, layer in enumerate(self.layers):
            _check_range(f"layer {i} heads", layer.heads, dims.heads)
            _check_range(f"layer {i} head_dim", layer.head_dim, dims.head_dim)
            if dims.fixed_head_dim and layer.head_dim != dims.head_dim:
                raise ValueError(
                    f"layer {i} head_dim is {layer.head_dim}; this model's attention needs every head's full"
                    f" {dims.head_dim} dimensions (cut heads, not head dimensions)"
                )
            _check_range(f"layer {i} ffn", layer.ffn, dims.ffn)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden": self.hidden,
            "layers": [{"heads": l.heads, "head_dim": l.head_dim, "ffn": l.ffn} for l in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ElasticSpec:
        try:
            layers = tuple(
                LayerSpec(heads=int(l["heads"]), head_dim=int(l["head_dim"]), ffn=int(l["ffn"]))
                for l in data["layers"]
            )
            return cls(hidden=int(data["hidden"]), layers=layers)
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"an elastic spec needs 'hidden' and 'layers' (each with 'heads', 'head_dim', 'ffn'): missing {exc}"
            ) from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ElasticSpec:
        return cls.from_dict(json.loads(text))

    def key(self) -> str:
        """A short stable identifier, e.g. for caches: ``h384-12x32x1536-...``."""
        return "h%d-%s" % (self.hidden, "-".join(f"{l.heads}x{l.head_dim}x{l.ffn}" for l in self.layers))


def _check_range(what: str, value: int, bound: int) -> None:
    if not isinstance(value, int) or not 1 <= value <= bound:
        raise ValueError(f"{what} is {value!r}; it must be an integer between 1 and {bound}")
