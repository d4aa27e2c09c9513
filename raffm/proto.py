"""Translation between the ``raffm.v1`` protobuf messages and the core's types: the one place each mapping lives.

Wire dtypes (the ``WireDtype`` enum <-> :mod:`raffm.wire`'s names), manifests and resume points of a transfer,
elastic specs, training recipes and cost estimates. Pure: messages in, values out; nothing here sends or receives.
Device profiles map in :mod:`raffm.profile` instead: it imports no torch, so neither does the registry, which
needs nothing else from here (it starts in a second, not several, and holds a fifth of the memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from raffm.recipe import Recipe
from raffm.spec import ElasticSpec, LayerSpec
from raffm.v1 import common_pb2, extractor_pb2
from raffm.wire import START, Manifest, ManifestError, ResumePoint, TensorMeta, WireError, wire_dtype_name

# raffm.v1.WireDtype values (0 = unspecified = float32) <-> wire dtype names.
_ENUM_TO_NAME = {0: "float32", 1: "float32", 2: "float16", 3: "bfloat16"}
_NAME_TO_ENUM = {"float32": 1, "float16": 2, "bfloat16": 3}


# ----------------------------------------------------------------------------------------------------- wire dtypes


def wire_dtype_from_proto(value: int) -> str:
    """The wire dtype name of a ``raffm.v1.WireDtype`` value (0, unspecified, is float32)."""
    try:
        return _ENUM_TO_NAME[int(value)]
    except KeyError:
        raise WireError(f"wire dtype enum value {value} is unknown; expected 0..3") from None


def wire_dtype_to_proto(name: str) -> common_pb2.WireDtype:
    """The ``raffm.v1.WireDtype`` value of a wire dtype name or alias."""
    return _NAME_TO_ENUM[wire_dtype_name(name)]  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------- transfers


def manifest_to_proto(manifest: Manifest, **fields: Any) -> common_pb2.Manifest:
    """A ``raffm.v1.Manifest`` for ``manifest``; extra keyword fields (model_version, spec, ...) are set as given."""
    return common_pb2.Manifest(
        tensors=[
            common_pb2.TensorInfo(name=m.name, dtype=m.dtype, shape=list(m.shape), nbytes=m.nbytes, sha256=m.sha256)
            for m in manifest.tensors
        ],
        total_bytes=manifest.total_bytes,
        **fields,
    )


def manifest_from_proto(msg: common_pb2.Manifest) -> Manifest:
    """Decode and check a ``raffm.v1.Manifest`` (ManifestError names the bad tensor)."""
    metas = tuple(
        TensorMeta(name=t.name, dtype=t.dtype, shape=tuple(int(d) for d in t.shape), nbytes=int(t.nbytes),
                   sha256=bytes(t.sha256))
        for t in msg.tensors
    )
    manifest = Manifest(metas)
    if msg.total_bytes and msg.total_bytes != manifest.total_bytes:
        raise ManifestError(f"manifest total_bytes is {msg.total_bytes}; its tensors add up to {manifest.total_bytes}")
    return manifest


def resume_from_proto(msg: common_pb2.ResumePoint | None) -> ResumePoint:
    return ResumePoint(msg.tensor, int(msg.offset)) if msg is not None and msg.tensor else START


def resume_to_proto(point: ResumePoint) -> common_pb2.ResumePoint:
    return common_pb2.ResumePoint(tensor=point.tensor, offset=point.offset)


# ----------------------------------------------------------------------------------------------------- specs


def spec_to_proto(spec: ElasticSpec) -> common_pb2.ElasticSpec:
    return common_pb2.ElasticSpec(
        hidden=spec.hidden,
        layers=[common_pb2.LayerSpec(heads=l.heads, head_dim=l.head_dim, ffn=l.ffn) for l in spec.layers],
    )


def spec_from_proto(msg: common_pb2.ElasticSpec) -> ElasticSpec:
    """``raffm.v1.ElasticSpec`` -> :class:`raffm.spec.ElasticSpec` (checked against a model by whoever uses it)."""
    if not msg.layers:
        raise ValueError("the spec has no layers")
    return ElasticSpec(
        hidden=int(msg.hidden),
        layers=tuple(LayerSpec(heads=int(l.heads), head_dim=int(l.head_dim), ffn=int(l.ffn)) for l in msg.layers),
    )


# ----------------------------------------------------------------------------------------------------- recipes


def recipe_to_proto(recipe: Recipe) -> common_pb2.TrainingRecipe:
    return common_pb2.TrainingRecipe(
        frozen_tensors=sorted(recipe.frozen), nested=[spec_to_proto(s) for s in recipe.nested],
        nested_sampled=recipe.sampled, distill=recipe.distill, frozen_dtype=recipe.frozen_dtype,
        base_dtype=recipe.base_dtype, activation_checkpointing=recipe.checkpointing,
        distill_hidden=recipe.distill_hidden,
        prior_correction=recipe.prior_correction, lora_rank=recipe.lora_rank, lora_targets=list(recipe.lora_targets) if recipe.lora_rank else [],
        lora_alpha=recipe.lora_alpha if recipe.lora_rank else 0.0, lr_scale=recipe.lr_scale,
        dropout_off=not recipe.dropout,
    )


def recipe_from_proto(msg: common_pb2.TrainingRecipe) -> Recipe:
    """An empty message is plain fine-tuning (distill 0 with no nested cut means nothing)."""
    return Recipe(
        frozen=frozenset(msg.frozen_tensors), nested=tuple(spec_from_proto(s) for s in msg.nested),
        sampled=int(msg.nested_sampled), distill=float(msg.distill) if msg.nested else 1.0,
        frozen_dtype=wire_dtype_name(msg.frozen_dtype or "float32"),
        base_dtype=wire_dtype_name(msg.base_dtype or "float32"), checkpointing=bool(msg.activation_checkpointing),
        distill_hidden=float(msg.distill_hidden), prior_correction=float(msg.prior_correction),
        lora_rank=int(msg.lora_rank),
        lora_targets=tuple(msg.lora_targets) if msg.lora_rank else (),
        lora_alpha=float(msg.lora_alpha) if msg.lora_rank and msg.lora_alpha else 16.0,
        lr_scale=float(msg.lr_scale) or 1.0, dropout=not msg.dropout_off,
    )


# ----------------------------------------------------------------------------------------------------- cost estimates

# raffm.v1.CostEstimate: what a plan predicts (the keys of raffm.planning's cost dicts).
COST_FIELDS = ("params", "wire_bytes", "flops_per_sample", "train_memory_mb", "infer_memory_mb", "download_s",
               "compute_s", "upload_s", "est_seconds", "upload_bytes", "trained_params")
_INTEGER_COSTS = {"params", "wire_bytes", "flops_per_sample", "upload_bytes", "trained_params"}


def cost_to_proto(cost: Mapping[str, float]) -> extractor_pb2.CostEstimate:
    values: dict[str, Any] = {k: (int(v) if k in _INTEGER_COSTS else float(v)) for k, v in cost.items()
                              if k in COST_FIELDS}
    return extractor_pb2.CostEstimate(**values)


def cost_from_proto(msg: extractor_pb2.CostEstimate) -> dict[str, float]:
    return {k: float(getattr(msg, k)) for k in COST_FIELDS}
