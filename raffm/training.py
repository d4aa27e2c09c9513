"""Local training and evaluation of (sub-)models: what a device runs, and what the server evaluates with.

Text batches are padded to their longest text, at most ``seq_len`` tokens (padding is masked out, so the model
computes the same; a batch of short reviews costs less); image batches are ``[B, C, H, W]`` float tensors; generative
(causal-LM) batches carry per-token ``labels`` that are -100 outside the response (:mod:`raffm.generative`). The result
of local training is the *delta* of the trained weights against the received ones, in float32 (with a LoRA recipe, of
the adapters).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from raffm.arch import adapter_for
from raffm.data import ImageDataset, TextDataset
from raffm.generative import IGNORE_INDEX, InstructionDataset, causal_batches
from raffm.lora import A_SUFFIX, B_SUFFIX, apply_lora, lora_modules
from raffm.memory import PeakMemory
from raffm.recipe import Recipe
from raffm.slicing import TensorSlice
from raffm.spec import ElasticSpec
from raffm.wire import WIRE_DTYPES

Dataset = TextDataset | ImageDataset | InstructionDataset
Tokenizer = Callable[..., Any]


OPTIMIZERS = ("adamw", "sgd")


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
    warmup_steps: int = 0  # the lr rises linearly from 0 over the first steps of every round (a fresh optimizer)
    optimizer: str = "adamw"  # one of OPTIMIZERS; a fresh one every round

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "local_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; it must be at least 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer is {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr is {self.lr}; it must be a positive number")
        if self.fedprox_mu < 0 or self.local_steps < 0 or self.warmup_steps < 0:
            raise ValueError("fedprox_mu, local_steps and warmup_steps must be >= 0")


def make_optimizer(params: Iterable[torch.Tensor], config: LocalConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The round's optimizer: AdamW, or plain SGD (no momentum: no state, the classic FedAvg client), at the config's
    lr x ``lr_scale`` and weight decay. :mod:`raffm.costs` prices AdamW's two states for both (for SGD, a bound)."""
    lr = config.lr * lr_scale
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


@dataclass(frozen=True)
class LocalResult:
    delta: dict[str, torch.Tensor]  # trained - received, float32, the sub-model's trained tensors
    samples: int  # examples trained on this round (the aggregation weight)
    loss: float  # mean training loss of the device's own spec
    steps: int
    seconds: float
    peak_memory_mb: float
    # A classifier's local data, examples per label id; empty for other tasks. Summed over a fleet they give its label
    # prior, which the server never sees otherwise (see raffm.threshold).
    label_counts: tuple[int, ...] = ()


def batches(
    data: Dataset, tokenizer: Tokenizer | None, batch_size: int, seq_len: int, *, shuffle: bool, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready batches with ``labels`` (``[B]`` classes, or ``[B, seq_len]`` tokens for generative data)."""
    if isinstance(data, InstructionDataset):
        yield from causal_batches(data, tokenizer, batch_size, seq_len, shuffle=shuffle, seed=seed)
        return
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        labels = torch.tensor([data.labels[i] for i in idx], dtype=torch.long)
        if isinstance(data, ImageDataset):
            yield {"pixel_values": data.pixels(idx), "labels": labels}
        else:
            if tokenizer is None:
                raise ValueError("text data needs a tokenizer")
            pairs = None if data.pairs is None else [data.pairs[i] for i in idx]
            enc = tokenizer([data.texts[i] for i in idx], text_pair=pairs, padding="longest", truncation=True,
                            max_length=seq_len, return_tensors="pt")
            batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
            if pairs is not None and "token_type_ids" in enc:  # which text each token is of (BERT's segments)
                batch["token_type_ids"] = enc["token_type_ids"]
            yield batch


def _leaf_view(param: torch.Tensor, where: TensorSlice) -> torch.Tensor:
    """The kept block of ``param`` as a leaf tensor sharing its memory, whose gradient is added into the block of
    ``param.grad`` the moment autograd has it (and then dropped).

    A leaf's gradient is accumulated as soon as it is ready; a view through autograd's slicing would instead hold
    every block's gradient until the end of the backward pass (one more copy of the cut's weights).
    """
    view = where.take_view(param.detach()).requires_grad_(True)

    def add_into_param(leaf: torch.Tensor) -> None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        assert leaf.grad is not None
        where.block(param.grad).add_(leaf.grad.reshape(where.keep))
        leaf.grad = None

    view.register_post_accumulate_grad_hook(add_into_param)
    return view


class NestedCut:
    """A smaller cut of a (sub-)model that trains on views of the model's own parameters.

    The skeleton is the elastic class of the cut, built on the ``meta`` device (no memory). A step binds fresh views
    of the live parameters into it for its forward *and* backward (activation checkpointing recomputes the forward
    during backward), so gradients flow into the model's own ``.grad`` and an optimizer step moves the cut with it.
    """

    def __init__(self, model: PreTrainedModel, spec: ElasticSpec, *, checkpointing: bool = False) -> None:
        from raffm.elastic import ELASTIC_CLASSES, elastic_config, stock_class
        from raffm.slicing import slice_plan

        adapter = adapter_for(model)
        outer = getattr(model, "elastic_spec", None) or ElasticSpec.full(adapter.dims(model.config))
        stock = stock_class(model)
        self.spec = spec
        self.plan = slice_plan(adapter, adapter.dims(model.config), spec,
                               {n: tuple(p.shape) for n, p in model.named_parameters()}, within=outer)
        with torch.device("meta"):
            self.skeleton = ELASTIC_CLASSES[stock](elastic_config(model.config, spec, stock))
        for name, p in model.named_parameters():  # tables the recipe stores at half precision: lookups in float32
            module = self.skeleton.get_submodule(name.rpartition(".")[0]) if name in self.plan else None
            if isinstance(module, torch.nn.Embedding) and p.dtype != torch.float32:
                _lookups_in_float32(module)
        if checkpointing:
            _enable_checkpointing(self.skeleton, [n for n, p in model.named_parameters() if p.requires_grad])
        self._model = model

    @contextmanager
    def bound(self) -> Iterator[PreTrainedModel]:
        """The skeleton, running on views of the model's current parameters (and its buffers) inside the block."""
        from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call binds with

        tensors: dict[str, torch.Tensor] = {
            name: _leaf_view(p, self.plan[name]) if p.requires_grad else self.plan[name].take_view(p.detach())
            for name, p in self._model.named_parameters() if name in self.plan
        }
        tensors.update(self._model.named_buffers())
        self.skeleton.train(self._model.training)
        # tie_weights: a tied LM head is bound with the embedding it shares (named_parameters lists it once)
        with _reparametrize_module(self.skeleton, tensors, tie_weights=True):
            yield self.skeleton

    def __call__(self, **inputs: torch.Tensor) -> Any:
        """A forward pass (no training): the cut's outputs."""
        with self.bound() as skeleton:
            return skeleton(**inputs)

    def backward(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, teacher: Teacher,
                 recipe: Recipe) -> None:
        """Accumulate the gradients of the cut's loss: ``distill`` x KL to the teacher's logits, ``1 - distill`` x
        cross-entropy on the ``labels``, plus ``distill_hidden`` x the mean squared error of every layer's output
        against the teacher's. Per-token ``labels`` ``[B, T]`` (a causal LM): both terms are over the next-token
        predictions of the labelled (response) tokens only."""
        with self.bound() as skeleton:
            out = skeleton(**inputs, output_hidden_states=bool(recipe.distill_hidden))
            student, target = out.logits, teacher.logits
            if labels.dim() == 2:  # position t predicts token t + 1; -100 marks prompt and padding
                keep = labels[:, 1:] != IGNORE_INDEX
                student, target, labels = student[:, :-1][keep], target[:, :-1][keep], labels[:, 1:][keep]
            loss = recipe.distill * _distill_loss(student, target)
            if recipe.distill < 1.0:
                loss = loss + (1 - recipe.distill) * torch.nn.functional.cross_entropy(student, labels)
            if recipe.distill_hidden:
                loss = loss + recipe.distill_hidden * _hidden_loss(out.hidden_states, teacher.hidden)
            loss.backward()


@dataclass(frozen=True)
class Teacher:
    """What the device's own spec computed on a batch, for its nested cuts to learn from (detached)."""

    logits: torch.Tensor
    hidden: tuple[torch.Tensor, ...] = ()  # every layer's output, when the recipe distills hidden states


def _hidden_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over the layers (the embedding output excluded) of the MSE between the cut's and the teacher's outputs."""
    pairs = list(zip(student[1:], teacher[1:]))
    return sum((torch.nn.functional.mse_loss(s, t) for s, t in pairs), torch.zeros(())) / max(1, len(pairs))


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the last axis, averaged over the batch (temperature 1)."""
    return torch.nn.functional.kl_div(
        torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1), reduction="batchmean", log_target=True
    )


def _apply_recipe(model: PreTrainedModel, recipe: Recipe, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """Freeze (and store at ``recipe.frozen_dtype``) the recipe's frozen tensors, switch activation checkpointing on;
    with a LoRA recipe, wrap the targets in adapters (unless the model already has them, e.g. loaded from the
    server's factors) and train those only; returns the trained parameters."""
    unknown = sorted(recipe.frozen - {n for n, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"the recipe freezes tensors the model does not have: {unknown[:5]}")
    lora = recipe.lora
    if lora is not None and not lora_modules(model):
        apply_lora(model, lora, generator=torch.Generator().manual_seed(seed))
    trained = {}
    half = adapter_for(model).vocab_tensors(recipe.frozen) if recipe.frozen_dtype != "float32" else frozenset()
    for name, p in model.named_parameters():
        train = name not in recipe.frozen and (lora is None or name.endswith((A_SUFFIX, B_SUFFIX)))
        p.requires_grad_(train)
        if train:
            trained[name] = p
        elif name in half:
            module = model.get_submodule(name.rpartition(".")[0])
            if not isinstance(module, torch.nn.Embedding):
                raise ValueError(f"only embedding tables can be stored at {recipe.frozen_dtype}; {name!r} is not one")
            p.data = p.data.to(WIRE_DTYPES[recipe.frozen_dtype])
            _lookups_in_float32(module)
    if recipe.checkpointing:
        _enable_checkpointing(model, trained)
    return trained


def _lookups_in_float32(module: torch.nn.Module) -> None:
    """An embedding table stored at half precision returns float32 lookups: the rest of the model computes in fp32
    (where the input embeddings are a sum of tables, type promotion would hide a half-precision one; DeBERTa-v3 and
    the decoders look up a single table)."""
    module.register_forward_hook(lambda _m, _i, out: out.float())


def _dropout_off(model: torch.nn.Module) -> None:
    """Every dropout of ``model`` at rate 0 (the attention kernels take their rate from these modules too)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _enable_checkpointing(model: PreTrainedModel, trained: Iterable[str]) -> None:
    """Activation checkpointing. transformers also makes the input embeddings' output require grad (for adapters on
    a frozen model); when the ``trained`` tensors leave the embeddings and the first layers frozen, that would run
    backward through those layers for nothing, so it is undone."""
    model.activation_checkpointing_enable()
    if adapter_for(model).frozen_layers(trained, int(model.config.num_hidden_layers)):
        model.disable_input_require_grads()


def train_local(
    model: PreTrainedModel,
    data: Dataset,
    tokenizer: Tokenizer | None,
    config: LocalConfig,
    *,
    recipe: Recipe = Recipe(),
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> LocalResult:
    """Train ``model`` in place on ``data`` with AdamW (plus a FedProx term when ``fedprox_mu`` > 0), as ``recipe`` says.

    ``on_step(step, total, loss)`` reports progress; ``should_stop()`` is checked between steps so a signal can
    abandon the round cleanly (a :class:`InterruptedError` is raised, nothing is half-written).
    ``reference``: the received weights of the trained tensors (any float dtype; e.g. memory-mapped from disk) to
    compute the delta and the FedProx term against; by default a copy is taken at the start, which costs one more
    copy of the trained weights. The model is consumed: frozen tensors may be stored at lower precision afterwards.
    """
    if len(data) == 0:
        raise ValueError("the local data set is empty")
    trained = _apply_recipe(model, recipe, config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    if reference is not None:
        received = dict(reference)
        for n, p in trained.items():
            if n not in received or tuple(received[n].shape) != tuple(p.shape):
                raise ValueError(f"reference tensor {n!r} is missing or not shaped {tuple(p.shape)}")
    else:
        received = {n: p.detach().clone() for n, p in trained.items()}
    cuts = [NestedCut(model, spec, checkpointing=recipe.checkpointing) for spec in recipe.nested]
    if not recipe.dropout:
        for module in (model, *(cut.skeleton for cut in cuts)):
            _dropout_off(module)
    counts = _label_counts(data, model.config)
    prior = _log_prior(counts, recipe.prior_correction)
    per_epoch = math.ceil(len(data) / config.batch_size)
    total = per_epoch * config.local_epochs
    if config.local_steps:
        total = min(total, config.local_steps)
    model.train()
    started = time.perf_counter()
    losses: list[float] = []
    samples = 0
    with PeakMemory() as peak:
        optimizer = make_optimizer(trained.values(), config, recipe.lr_scale)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: min(1.0, (i + 1) / config.warmup_steps) if config.warmup_steps else 1.0)
        step = 0
        for epoch in range(config.local_epochs):
            for batch in batches(data, tokenizer, config.batch_size, config.seq_len, shuffle=True, seed=config.seed + epoch):
                if step >= total:
                    break
                if should_stop():
                    raise InterruptedError("local training stopped by request")
                out = model(**batch, output_hidden_states=bool(cuts and recipe.distill_hidden))
                loss = out.loss if prior is None else torch.nn.functional.cross_entropy(out.logits + prior,
                                                                                        batch["labels"])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the lr")
                if config.fedprox_mu > 0:
                    prox = sum(((p - received[n]) ** 2).sum() for n, p in trained.items())
                    loss = loss + 0.5 * config.fedprox_mu * prox
                losses.append(float(out.loss.detach()))
                teacher = Teacher(out.logits.detach(), tuple(h.detach() for h in out.hidden_states or ())) if cuts else None
                del out  # a causal LM's logits (tokens x vocab) must not stay alive through backward
                loss.backward()
                del loss
                labels = batch.pop("labels")
                if teacher is not None:
                    for cut in _cuts_this_step(cuts, recipe.sampled, rng):
                        cut.backward(batch, labels, teacher, recipe)
                optimizer.step()
                warmup.step()
                # Free the gradients now, not before the next backward: otherwise they stay alive through the next
                # forward and the step's peak is one model larger than raffm.costs predicts.
                optimizer.zero_grad(set_to_none=True)
                step += 1
                samples += len(labels)
                if on_step:
                    on_step(step, total, losses[-1])
        del optimizer, warmup
    model.eval()
    delta = {n: (p.detach() - received[n]).float() for n, p in trained.items()}
    return LocalResult(
        delta=delta,
        samples=samples,
        loss=sum(losses) / max(1, len(losses)),
        steps=len(losses),
        seconds=time.perf_counter() - started,
        peak_memory_mb=peak.peak_mb,
        label_counts=() if counts is None else tuple(counts.tolist()),
    )


def distill_cuts(
    model: PreTrainedModel, data: Dataset, tokenizer: Tokenizer | None, config: LocalConfig, *, recipe: Recipe
) -> LocalResult:
    """The server's distillation step (strategy option ``server_distill_steps``): after a round's merge, every cut in
    ``recipe.nested`` learns the logits ``model`` computes (eval mode, before any step) on unlabelled ``data`` (its
    labels, if any, are never read), as FedDF and ScaleFL distil on the server: the average of a round's models is a
    better model than the cuts of it that the devices trained, and the step aims that gain at the cuts. The model
    itself is held to the same logits (the cuts share its leading weights) with as much weight as all its cuts
    together, so that its function stays put.

    Trains ``model`` in place for ``config.local_steps`` steps of AdamW (``config.lr`` x ``recipe.lr_scale``) and
    returns the delta of its trained tensors (those ``recipe`` does not freeze); ``loss`` is the cuts' mean
    distillation loss."""
    if len(data) == 0:
        raise ValueError("the distillation data set is empty")
    if isinstance(data, InstructionDataset):
        raise ValueError("server distillation is for classification; a causal LM's cuts are not distilled")
    if not recipe.nested:
        raise ValueError("the recipe has no nested cuts to distil")
    if config.local_steps < 1:
        raise ValueError("server distillation needs local_steps >= 1")
    trained = _apply_recipe(model, replace(recipe, frozen_dtype="float32", checkpointing=False), config.seed)
    received = {n: p.detach().clone() for n, p in trained.items()}
    cuts = [NestedCut(model, spec) for spec in recipe.nested]
    epochs = math.ceil(config.local_steps / math.ceil(len(data) / config.batch_size))
    stream = (b for e in range(epochs)
              for b in batches(data, tokenizer, config.batch_size, config.seq_len, shuffle=True, seed=config.seed + e))
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b, _ in zip(stream, range(config.local_steps))]
    model.eval()
    with torch.no_grad():  # the teacher: the merged model as it is, without dropout
        targets = [model(**batch).logits for batch in inputs]
    started, losses = time.perf_counter(), []
    optimizer = make_optimizer(trained.values(), config, recipe.lr_scale)
    model.train()
    with PeakMemory() as peak, torch.random.fork_rng(devices=[]):  # seeded dropout; the caller's RNG left as it was
        torch.manual_seed(config.seed)
        for batch, target in zip(inputs, targets):
            (len(cuts) * _distill_loss(model(**batch).logits, target)).backward()
            for cut in cuts:
                with cut.bound() as skeleton:
                    loss = _distill_loss(skeleton(**batch).logits, target)
                    loss.backward()
                losses.append(float(loss.detach()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return LocalResult(
        delta={n: (p.detach() - received[n]).float() for n, p in trained.items()},
        samples=sum(len(t) for t in targets),
        loss=sum(losses) / max(1, len(losses)),
        steps=len(targets),
        seconds=time.perf_counter() - started,
        peak_memory_mb=peak.peak_mb,
    )


def with_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with ``delta`` added to the tensors it names (each kept at its own dtype)."""
    unknown = sorted(set(delta) - set(state))
    if unknown:
        raise ValueError(f"the delta names tensors the state does not have: {unknown[:5]}")
    return {n: (t + delta[n]).to(t.dtype) if n in delta else t for n, t in state.items()}


def _label_counts(data: Any, config: Any) -> torch.Tensor | None:
    """The data's examples per label id of the model (None when the data has no class labels: a causal LM's answers
    are tokens)."""
    labels = getattr(data, "labels", None)
    if labels is None:
        return None
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=config.num_labels)
    if counts.numel() != config.num_labels:
        raise ValueError(f"the data has labels up to {counts.numel() - 1}; the model has {config.num_labels} labels")
    return counts


def _log_prior(counts: torch.Tensor | None, tau: float) -> torch.Tensor | None:
    """``tau`` x the log of the label distribution of ``counts`` (add-one smoothed): the logit adjustment of
    :attr:`Recipe.prior_correction`. None when off or without class labels."""
    if not tau or counts is None:
        return None
    counts = counts.double()
    return (tau * torch.log((counts + 1) / (counts.sum() + counts.numel()))).float()


def _cuts_this_step(cuts: list[NestedCut], sampled: int, rng: random.Random) -> list[NestedCut]:
    """The sandwich rule: the smallest nested cut every step, plus ``sampled`` of the others at random."""
    if not cuts:
        return []
    smallest, others = cuts[0], cuts[1:]
    return [smallest, *rng.sample(others, min(sampled, len(others)))]


@dataclass(frozen=True)
class Scores:
    """A classifier on labelled data: ``accuracy``, and ``balanced_accuracy``, the mean over the labels present of
    the share of their examples predicted right: a model that predicts one label for everything scores 1 / labels
    whatever the labels' shares, so a swing of the decision threshold shows as one beside the accuracy."""

    accuracy: float
    balanced_accuracy: float


@torch.no_grad()
def classification_scores(
    model: nn.Module, data: Dataset, tokenizer: Tokenizer | None, *, batch_size: int = 64, seq_len: int = 64
) -> Scores:
    """:class:`Scores` of ``model`` on ``data``; generative data: :func:`raffm.generative.evaluate_generative`."""
    if len(data) == 0:
        raise ValueError("the evaluation data set is empty")
    if isinstance(data, InstructionDataset):
        raise ValueError("accuracy is for classification data; score generative data with "
                         "raffm.generative.evaluate_generative (exact match and response loss)")
    was_training = model.training
    model.eval()
    predicted, gold = [], []
    for batch in batches(data, tokenizer, batch_size, seq_len, shuffle=False):
        gold.append(batch.pop("labels"))
        predicted.append(model(**batch).logits.argmax(-1))
    model.train(was_training)
    right, labels = torch.cat(predicted) == torch.cat(gold), torch.cat(gold)
    recalls = [right[labels == label].float().mean() for label in labels.unique()]
    return Scores(float(right.float().mean()), float(torch.stack(recalls).mean()))


def evaluate(
    model: nn.Module, data: Dataset, tokenizer: Tokenizer | None, *, batch_size: int = 64, seq_len: int = 64
) -> float:
    """Accuracy of ``model`` on ``data`` (0..1); see :func:`classification_scores`."""
    return classification_scores(model, data, tokenizer, batch_size=batch_size, seq_len=seq_len).accuracy
