"""Local training and evaluation of (sub-)models: what a device runs, and what the server evaluates with.

Text batches are tokenized to a fixed ``seq_len``; image batches are ``[B, C, H, W]`` float tensors. The result of
local training is the *delta* of the trained weights against the received ones, in float32.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from raffm.data import ImageDataset, TextDataset
from raffm.memory import PeakMemory

Dataset = TextDataset | ImageDataset
Tokenizer = Callable[..., Any]


@dataclass(frozen=True)
class LocalConfig:
    """Hyper-parameters of one device's local round (from its assignment)."""

    batch_size: int = 16
    seq_len: int = 64
    lr: float = 5e-5
    local_epochs: int = 1
    local_steps: int = 0  # > 0 caps the number of optimizer steps
    fedprox_mu: float = 0.0
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "local_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr is {self.lr}; it must be a positive number")
        if self.fedprox_mu < 0 or self.local_steps < 0:
            raise ValueError("fedprox_mu and local_steps must be >= 0")


@dataclass(frozen=True)
class LocalResult:
    delta: dict[str, torch.Tensor]  # trained - received, float32, sub-model names and shapes
    samples: int  # examples seen (the aggregation weight is the local data size)
    loss: float  # mean training loss
    steps: int
    seconds: float
    peak_memory_mb: float


def batches(
    data: Dataset, tokenizer: Tokenizer | None, batch_size: int, seq_len: int, *, shuffle: bool, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready batches with ``labels``."""
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        labels = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
        if isinstance(data, ImageDataset):
            yield {"pixel_values": data.images[idx], "labels": labels}
        else:
            if tokenizer is None:
                raise ValueError("text data needs a tokenizer")
            enc = tokenizer(
                [data.texts[i] for i in idx], padding="max_length", truncation=True, max_length=seq_len,
                return_tensors="pt",
            )
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def train_local(
    model: PreTrainedModel,
    data: Dataset,
    tokenizer: Tokenizer | None,
    config: LocalConfig,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train ``model`` in place on ``data`` with AdamW (plus a FedProx term when ``fedprox_mu`` > 0).

    ``on_step(step, total, loss)`` reports progress; ``should_stop()`` is checked between steps so a signal can
    abandon the round cleanly (a :class:`InterruptedError` is raised, nothing is half-written).
    ``reference``: the received weights (any float dtype; e.g. memory-mapped from disk) to compute the delta and the
    FedProx term against; by default a copy is taken at the start, which costs one more model's worth of memory.
    """
    if len(data) == 0:
        raise ValueError("the local data set is empty")
    torch.manual_seed(config.seed)
    if reference is not None:
        received = dict(reference)
        for n, p in model.named_parameters():
            if n not in received or tuple(received[n].shape) != tuple(p.shape):
                raise ValueError(f"reference tensor {n!r} is missing or not shaped {tuple(p.shape)}")
    else:
        received = {n: p.detach().clone() for n, p in model.named_parameters()}
    per_epoch = math.ceil(len(data) / config.batch_size)
    total = per_epoch * config.local_epochs
    if config.local_steps:
        total = min(total, config.local_steps)
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    with PeakMemory() as peak:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        step = 0
        for epoch in range(config.local_epochs):
            for batch in batches(data, tokenizer, config.batch_size, config.seq_len, shuffle=True, seed=config.seed + epoch):
                if step >= total:
                    break
                if should_stop():
                    raise InterruptedError("local training stopped by request")
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the lr")
                if config.fedprox_mu > 0:
                    prox = sum(((p - received[n]) ** 2).sum() for n, p in model.named_parameters())
                    loss = loss + 0.5 * config.fedprox_mu * prox
                loss.backward()
                optimizer.step()
                # Free the gradients now, not before the next backward: otherwise they stay alive through the next
                # forward and the step's peak is one model larger than raffm.costs predicts.
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(float(loss.detach()))
                if on_step:
                    on_step(step, total, losses[-1])
        del optimizer
    model.eval()
    delta = {n: (p.detach() - received[n]).float() for n, p in model.named_parameters()}
    return LocalResult(
        delta=delta,
        samples=len(data),
        loss=sum(losses) / max(1, len(losses)),
        steps=len(losses),
        seconds=time.perf_counter() - started,
        peak_memory_mb=peak.peak_mb,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, tokenizer: Tokenizer | None, *, batch_size: int = 64, seq_len: int = 64
) -> float:
    """Accuracy of ``model`` on ``data`` (0..1)."""
    if len(data) == 0:
        raise ValueError("the evaluation data set is empty")
    was_training = model.training
    model.eval()
    correct = 0
    for batch in batches(data, tokenizer, batch_size, seq_len, shuffle=False):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return correct / len(data)
