"""One local round on the device: predict its memory, build the sub-model, train it, and measure what it cost.

Memory is the point of RaFFM, so the agent checks it twice: *before* (the cost model of :mod:`raffm.costs`, plus
what this agent adds on top of the formula: a FedProx reference) and *after* (the peak RSS growth of the whole local
round, from the downloaded tensors to the end of training, reported to the aggregator next to the prediction).
The received weights that the delta is computed against are spilled to a file in the state directory and
memory-mapped, so the round holds one copy of the weights in RAM, as the cost model assumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from raffm.data import ImageDataset, TextDataset
from raffm.generative import InstructionDataset
from raffm.lora import A_SUFFIX, B_SUFFIX
from raffm.memory import collect_garbage, peak_rss_mb, rss_mb, start_measuring
from raffm.planning import cost_model_for
from raffm.recipe import Recipe
from raffm.spec import ElasticSpec
from raffm.training import LocalConfig, LocalResult, train_local

log = logging.getLogger("edge_agent.trainer")


@dataclass(frozen=True)
class MemoryPrediction:
    train_memory_mb: float  # the cost model's peak for this spec, batch and sequence length
    extra_mb: float  # what this agent adds: the FedProx reference and its term
    params: int

    @property
    def total_mb(self) -> float:
        return self.train_memory_mb + self.extra_mb


def predict_memory(
    config: PretrainedConfig, spec: ElasticSpec, *, batch_size: int, seq_len: int, fedprox: bool, image: bool,
    recipe: Recipe = Recipe(), task: str | None = None,
) -> MemoryPrediction:
    from edge_agent.submodel import task_name

    model = cost_model_for(config, task=task_name(image, task))  # type: ignore[arg-type]
    costs = model.estimate(spec, batch_size=batch_size, seq_len=None if image else seq_len, recipe=recipe)
    extra = 2 * costs.gradients_mb if fedprox else 0.0  # mapped reference pages + the saved (w - w0) of the term
    return MemoryPrediction(costs.train_memory_mb, extra, costs.params)


def spill(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Write the received weights to ``path`` and map them back read-only: the delta's reference, off the heap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(dict(tensors), tmp)
    os.replace(tmp, path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # type: ignore[no-any-return]


def is_adapter(name: str) -> bool:
    """A LoRA adapter tensor (``<module>.lora_A`` / ``.lora_B``), as opposed to a base weight of the slice."""
    return name.endswith((A_SUFFIX, B_SUFFIX))


class MemoryMeter:
    """Peak RSS growth from ``start()`` over a block that may reset the kernel's high-water mark itself
    (``train_local`` does): the high-water mark is sampled before each such block with :meth:`checkpoint`."""

    def __init__(self) -> None:
        self.baseline_mb = 0.0
        self._peak_mb = 0.0

    def start(self) -> None:
        start_measuring()
        self.baseline_mb = rss_mb()
        self._peak_mb = self.baseline_mb

    def checkpoint(self) -> None:
        self._peak_mb = max(self._peak_mb, peak_rss_mb())

    @property
    def peak_mb(self) -> float:
        self.checkpoint()
        return max(0.0, self._peak_mb - self.baseline_mb)


def run_local_round(
    tensors: dict[str, torch.Tensor],
    *,
    global_config: PretrainedConfig,
    spec: ElasticSpec,
    data: TextDataset | ImageDataset | InstructionDataset,
    tokenizer: Any,
    local: LocalConfig,
    spill_path: Path,
    meter: MemoryMeter,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    recipe: Recipe = Recipe(),
    task: str | None = None,
) -> LocalResult:
    """Build the sub-model from ``tensors`` (taken over: the dict is emptied) and train it as ``recipe`` says; the
    delta (of the trained tensors) is float32.

    ``meter`` must have been started before the tensors were downloaded, so the weights count in the peak.
    """
    from edge_agent.submodel import build_submodel

    image = isinstance(data, ImageDataset)
    adapters = {n: tensors.pop(n) for n in [n for n in tensors if is_adapter(n)]}
    if adapters and recipe.lora is None:
        raise ValueError(f"the download holds LoRA adapters ({sorted(adapters)[:3]}) but the recipe has no LoRA rank")
    # The delta's reference: the trained tensors as received (with LoRA, the adapters the server sent; without any,
    # train_local starts fresh adapters and keeps its own copy of them).
    trained = adapters if recipe.lora is not None else {n: t for n, t in tensors.items() if n not in recipe.frozen}
    reference = spill(trained, spill_path) if trained else None
    try:
        model = build_submodel(global_config, spec, tensors, image=image, recipe=recipe, task=task)
        if adapters:
            from raffm.lora import apply_lora, load_adapters

            assert recipe.lora is not None
            apply_lora(model, recipe.lora)
            load_adapters(model, {n: t.float() for n, t in adapters.items()})
        tensors.clear()  # the model owns the weights now; wire-dtype copies (fp16/bf16) can go
        collect_garbage()
        meter.checkpoint()
        result = train_local(model, data, tokenizer, local, recipe=recipe, on_step=on_step, should_stop=should_stop,
                             reference=reference)
        meter.checkpoint()
        del model
        return result
    finally:
        del reference
        collect_garbage()
        try:
            spill_path.unlink()
        except OSError:
            pass
