"""Building the assigned sub-model on the device from downloaded tensors, without the global model.

The skeleton is the elastic ``transformers`` class for the global config and the spec
(:func:`raffm.elastic.elastic_config`), built on the ``meta`` device so nothing of the global size is ever allocated;
the downloaded tensors are then assigned as its parameters (converted to fp32: training is always fp32) and the few
non-persistent buffers (position and token-type ids) are materialised.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from raffm.recipe import Recipe
from raffm.spec import ElasticSpec
from raffm.wire import WIRE_DTYPES


def global_config(manifest_proto: Any, *, fallback_model: str, num_labels: int) -> PretrainedConfig:
    """The global model's config: from the manifest when the extractor ships it, else the device's ``--model``."""
    if manifest_proto.model_config_json:
        values = json.loads(manifest_proto.model_config_json)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ValueError("the manifest's model config has no model_type")
        model_type = str(model_type).removeprefix("raffm_")
        for key in ("raffm_spec", "transformers_version", "architectures"):
            values.pop(key, None)
        config = AutoConfig.for_model(model_type, **values)
    else:
        from raffm.models import load_config

        config = load_config(fallback_model)
    if num_labels and config.num_labels != num_labels:
        config.num_labels = num_labels
    return config


def _stock_class(config: PretrainedConfig, task: str) -> type[PreTrainedModel]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    mapping = {"image-classification": MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
               "causal-lm": MODEL_FOR_CAUSAL_LM_MAPPING}.get(task, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)
    try:
        return mapping[type(config)]  # type: ignore[no-any-return,return-value]
    except KeyError:
        raise ValueError(f"model type {config.model_type!r} has no {task} class") from None


def task_name(image: bool, task: str | None) -> str:
    """The task of a sub-model: ``task`` when given, else image or sequence classification."""
    return task or ("image-classification" if image else "sequence-classification")


def _buffer_value(name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Values of the non-persistent buffers the supported architectures have (never sent over the wire)."""
    if name.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=dtype).expand(shape).clone()
    if name.endswith("token_type_ids"):
        return torch.zeros(shape, dtype=dtype)
    raise ValueError(f"buffer {name!r} is not in the download and its value is unknown; "
                     "add it to edge_agent.submodel._buffer_value")


def _rebuild_rotary(model: PreTrainedModel) -> None:
    """Rebuild rotary position embeddings off the meta device: their frequency buffers are computed from the config
    (the full head dim, which every sub-model keeps), never sent."""
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] == "rotary_emb" and any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, type(module)(module.config))


def build_submodel(
    config: PretrainedConfig, spec: ElasticSpec, tensors: Mapping[str, torch.Tensor], *, image: bool = False,
    recipe: Recipe = Recipe(), task: str | None = None,
) -> PreTrainedModel:
    """An elastic HF model of ``spec`` whose parameters are ``tensors`` (any float dtype; stored as fp32, except the
    recipe's frozen vocabulary, stored at its ``frozen_dtype``).

    Tensors already in their storage dtype become the model's parameters without a copy, so the caller must not use
    them afterwards. ``ValueError`` names missing, unexpected or mis-shaped tensors.
    """
    from raffm.arch import adapter_for, tied_aliases
    from raffm.elastic import ELASTIC_CLASSES, elastic_config

    spec.validate(adapter_for(config).dims(config))
    stock = _stock_class(config, task_name(image, task))
    if stock not in ELASTIC_CLASSES:
        raise ValueError(f"{stock.__name__} has no elastic variant; supported: "
                         f"{', '.join(c.__name__ for c in ELASTIC_CLASSES)}")
    sub_config = elastic_config(config, spec, stock)
    with torch.device("meta"):
        model = ELASTIC_CLASSES[stock](sub_config)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected) - {n for n, _ in model.named_buffers()})
    if missing or extra:
        raise ValueError(f"downloaded tensors do not match the sub-model: missing {missing[:5]}, unexpected {extra[:5]}")
    state: dict[str, torch.Tensor] = {}
    half = adapter_for(config).vocab_tensors(recipe.frozen)
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}; the spec needs {shape}")
        # tensors in their storage dtype are adopted as they are (the caller hands them over): no second copy
        dtype = WIRE_DTYPES[recipe.frozen_dtype] if name in half else torch.float32
        state[name] = t.to(dtype) if t.dtype != dtype else t
    tied = tied_aliases(model)  # before loading: assigning the embedding unties it
    model.load_state_dict(state, strict=False, assign=True)
    if tied:  # the tied LM head still holds the meta tensor: point it at the loaded embedding
        model.tie_weights()
    _rebuild_rotary(model)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            module_name, _, bname = name.rpartition(".")
            value = tensors[name].to(buf.dtype) if name in tensors else _buffer_value(name, buf.shape, buf.dtype)
            model.get_submodule(module_name).register_buffer(bname, value, persistent=False)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:  # tied weights or parameters the state dict does not name
        raise ValueError(f"sub-model parameters without values: {leftover[:5]}")
    return model.train()
