"""Architecture adapters: which tensor axes are coupled, declared once per architecture.

Every parameter of a supported model is described by a *layout*: one :class:`Axis` per tensor axis saying what that
axis indexes. Salience ordering permutes every axis of the same kind (and layer) together; slicing keeps a leading
block of it. Adding an architecture is adding one :class:`Adapter` with its table of rules.

Axis kinds:
- ``hidden``: the residual-stream width, shared by the whole model;
- ``qk``: the query/key output rows of one layer, viewed as ``[heads, head_dim]``;
- ``v``: the value rows of one layer and the matching input columns of the attention output, ``[heads, head_dim]``;
- ``ffn``: the feed-forward neurons of one layer (W_in rows, b_in, W_out columns);
- ``full``: anything never sliced (vocabulary, positions, labels, image channels, patch pixels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any, Literal

from torch import nn

from raffm.spec import ModelDims

AxisKind = Literal["hidden", "qk", "v", "ffn", "full"]
HEAD_KINDS: tuple[AxisKind, ...] = ("qk", "v")


@dataclass(frozen=True)
class Axis:
    kind: AxisKind
    layer: int | None = None  # set for qk, v and ffn axes


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    kinds: tuple[AxisKind, ...]


def _rules(table: list[tuple[str, tuple[AxisKind, ...]]]) -> tuple[Rule, ...]:
    return tuple(Rule(re.compile(p), kinds) for p, kinds in table)


@dataclass(frozen=True)
class Adapter:
    """How one architecture family maps onto elastic axes.

    ``layer_pattern`` captures the layer index of per-layer tensors; ``layers_attr`` is the dotted path (below the
    base model) of the ``nn.ModuleList`` of layers; ``attention_attrs`` names the attention module (relative to a
    layer) and its head-size attribute, patched when a sub-model keeps fewer head dimensions.
    """

    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    layer_pattern: re.Pattern[str]
    layers_attr: str
    attention_module: str
    head_dim_attr: str
    # Vocabulary-sized embedding tensors (the strategy may freeze them: on MiniLM they are half the parameters).
    vocab_embeddings: re.Pattern[str] | None = None

    def dims(self, config: Any) -> ModelDims:
        heads = int(config.num_attention_heads)
        return ModelDims(
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            head_dim=int(config.hidden_size) // heads,
            ffn=int(config.intermediate_size),
        )

    def layout(self, name: str) -> tuple[Axis, ...]:
        """The axes of parameter ``name``; ``ValueError`` for a tensor this adapter does not know."""
        for rule in self.rules:
            if rule.pattern.search(name):
                match = self.layer_pattern.search(name)
                layer = int(match.group(1)) if match else None
                return tuple(Axis(k, layer if k in ("qk", "v", "ffn") else None) for k in rule.kinds)
        raise ValueError(f"{self.name} adapter does not know tensor {name!r}; add a rule for it in raffm/arch.py")

    def vocab_tensors(self, names: Iterable[str]) -> frozenset[str]:
        """The vocabulary embedding tensors among ``names`` (none for architectures without a vocabulary)."""
        pattern = self.vocab_embeddings
        return frozenset(n for n in names if pattern is not None and pattern.search(n))

    def layer_of(self, name: str) -> int | None:
        match = self.layer_pattern.search(name)
        return int(match.group(1)) if match else None


_BERT_RULES: list[tuple[str, tuple[AxisKind, ...]]] = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", ("full", "hidden")),
    (r"attention\.self\.(query|key)\.weight$", ("qk", "hidden")),
    (r"attention\.self\.(query|key)\.bias$", ("qk",)),
    (r"attention\.self\.value\.weight$", ("v", "hidden")),
    (r"attention\.self\.value\.bias$", ("v",)),
    (r"attention\.output\.dense\.weight$", ("hidden", "v")),
    (r"intermediate\.dense\.weight$", ("ffn", "hidden")),
    (r"intermediate\.dense\.bias$", ("ffn",)),
    (r"layer\.\d+\.output\.dense\.weight$", ("hidden", "ffn")),
    (r"(pooler|classifier)\.dense\.weight$", ("hidden", "hidden")),  # BERT pooler, RoBERTa head
    (r"(classifier|classifier\.out_proj)\.weight$", ("full", "hidden")),
    (r"(classifier|classifier\.out_proj)\.bias$", ("full",)),
    (r"(LayerNorm\.(weight|bias)|dense\.bias)$", ("hidden",)),
]

BERT = Adapter(
    name="bert",
    model_types=("bert", "roberta", "raffm_bert", "raffm_roberta"),
    rules=_rules(_BERT_RULES),
    layer_pattern=re.compile(r"encoder\.layer\.(\d+)\."),
    layers_attr="encoder.layer",
    attention_module="attention.self",
    head_dim_attr="attention_head_size",
    vocab_embeddings=re.compile(r"embeddings\.word_embeddings\.weight$"),
)

VIT = Adapter(
    name="vit",
    model_types=("vit", "raffm_vit"),
    rules=_rules(
        [
            (r"embeddings\.(cls_token|mask_token|position_embeddings)$", ("full", "full", "hidden")),
            (r"patch_embeddings\.projection\.weight$", ("hidden", "full", "full", "full")),
            (r"attention\.(q_proj|k_proj)\.weight$", ("qk", "hidden")),
            (r"attention\.(q_proj|k_proj)\.bias$", ("qk",)),
            (r"attention\.v_proj\.weight$", ("v", "hidden")),
            (r"attention\.v_proj\.bias$", ("v",)),
            (r"attention\.o_proj\.weight$", ("hidden", "v")),
            (r"mlp\.fc1\.weight$", ("ffn", "hidden")),
            (r"mlp\.fc1\.bias$", ("ffn",)),
            (r"mlp\.fc2\.weight$", ("hidden", "ffn")),
            (r"pooler\.dense\.weight$", ("hidden", "hidden")),
            (r"^classifier\.weight$", ("full", "hidden")),
            (r"^classifier\.bias$", ("full",)),
            (r"(layernorm\w*\.(weight|bias)|projection\.bias|o_proj\.bias|fc2\.bias|pooler\.dense\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"layers\.(\d+)\."),
    layers_attr="layers",
    attention_module="attention",
    head_dim_attr="head_dim",
)

ADAPTERS = (BERT, VIT)


def adapter_for(config_or_model: Any) -> Adapter:
    """The adapter for a ``transformers`` config or model; ``ValueError`` names the supported model types."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = sorted(t for a in ADAPTERS for t in a.model_types if not t.startswith("raffm_"))
    raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(supported)}")


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body of a model with or without a task head (``model.bert``, ``model.vit``...)."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model
