"""The default evaluation hook: accuracy of each new global model, and of chosen sub-model sizes, on a held-out split
the server owns.

Enabled by the job's ``eval_data``: a CSV/JSON file of texts and labels (:func:`raffm.data.load_text_file`: named
labels numbered by the job's ``labels``), ``rotten_tomatoes`` (the built-in corpus's test split: a seeded 10% that
``heldout_split`` also tells devices to leave out), or for image models a ``.pt``/``.npz`` file
(:func:`raffm.data.load_image_file`), a folder of images in label subfolders (:func:`raffm.data.load_image_folder`),
both fitted to the model's input size, or ``mnist``. Text is tokenized with the
tokenizer in the job's model folder. ``eval_fractions`` adds cuts keeping those shares of the forward compute
(:func:`raffm.scaling.spec_for_fraction`, cut with :func:`raffm.elastic.extract`), so a run shows how every
deployable size improves, not only the full model.

Result keys: ``accuracy`` and ``balanced_accuracy`` (the global model; :class:`raffm.training.Scores`), and
``accuracy@<fraction>``, ``balanced_accuracy@<fraction>``, ``flops@<fraction>`` and ``params@<fraction>`` (the shares
the cut keeps) per size. With the job's ``distill_data`` (unlabelled inputs) and the label counts the round's devices
reported, a classifier is also scored as it would be served: ``served_accuracy`` and ``served_balanced_accuracy``, with
its threshold fitted on those inputs to the fleet's label prior (:func:`raffm.threshold.fit_threshold`; devices train
for balanced labels, so the model's own threshold serves no distribution in particular). The aggregator publishes
every key as ``raffm_aggregator_eval{metric, size}``.

A ``causal-lm`` job evaluates prompt -> response pairs instead (:func:`raffm.generative.evaluate_generative`):
``eval_data`` is what :func:`raffm.generative.load_instructions` reads (a CSV/JSON file of ``{"prompt": ...,
"response": ...}`` objects, a labelled text file asked for its labels, or ``rotten_tomatoes``: the same held-out
reviews as instructions), and the keys are
``exact_match`` (greedy answers equal to the reference) and ``loss`` (mean response-token cross-entropy, nats), with
``@<fraction>`` per cut.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from raffm.data import (
    ImageDataset, TextDataset, load_image_file, load_image_folder, load_text_file, mnist_5k, rotten_tomatoes,
    train_test_split,
)
from raffm.generative import InstructionDataset, load_instructions
from raffm.training import Tokenizer

log = logging.getLogger(__name__)
Dataset = TextDataset | ImageDataset | InstructionDataset
BUILTIN_TEST_FRACTION = 0.1
BUILTIN_SPLIT_SEED = 0


def size_label(fraction: float) -> str:
    """``0.25`` -> ``"0.25"``, ``1.0`` -> ``"1"``: a stable, low-cardinality metrics label and result-key suffix."""
    return f"{fraction:g}"


def describe(evaluation: Mapping[str, float]) -> str:
    """One log-line phrase for a round's evaluation: the global model's accuracy, then each evaluated size's."""
    if not evaluation:
        return "no held-out evaluation"
    parts = []
    if "accuracy" in evaluation:
        balanced = f" (balanced {evaluation['balanced_accuracy']:.1%})" if "balanced_accuracy" in evaluation else ""
        served = (f", served at the fleet's label prior {evaluation['served_accuracy']:.1%}"
                  if "served_accuracy" in evaluation else "")
        parts.append(f"held-out accuracy {evaluation['accuracy']:.1%}{balanced}{served}")
    if "exact_match" in evaluation:
        parts.append(f"held-out exact match {evaluation['exact_match']:.1%}")
    for prefix, phrase in (("accuracy@", "by share of the compute"),
                           ("matched_accuracy@", "matched to the full model")):
        sizes = sorted((float(k.partition("@")[2]), k) for k in evaluation if k.startswith(prefix))
        if sizes:
            parts.append(f"{phrase} " + ", ".join(
                f"{size_label(fraction)}: {evaluation[key]:.1%}" for fraction, key in sizes))
    shown = ("accuracy", "balanced_accuracy", "exact_match", "served_accuracy", "served_balanced_accuracy")
    others = sorted(k for k in evaluation if "@" not in k and k not in shown)
    parts += [f"{k} {evaluation[k]:.4g}" for k in others]
    return "; ".join(parts)


def heldout_split(data: Dataset) -> tuple[list[int], list[int]]:
    """(train indices, test indices) of a built-in corpus: the test part is what the server evaluates on."""
    return train_test_split(len(data), BUILTIN_TEST_FRACTION, BUILTIN_SPLIT_SEED)


def load_eval_data(spec: str, *, max_samples: int = 0, task: str = "sequence-classification",
                   label_names: Sequence[str] = ()) -> Dataset:
    """The held-out data named by a job's ``eval_data`` (at most ``max_samples`` examples when > 0; named labels
    numbered by ``label_names``, the job's); prompt -> response pairs for a ``causal-lm`` task."""
    if task == "causal-lm":
        data: Dataset = load_instructions(spec, label_names=label_names)
        if spec == "rotten_tomatoes":
            data = data.subset(heldout_split(data)[1])
        if max_samples and len(data) > max_samples:
            data = data.subset(range(max_samples))
        return data
    if spec in ("rotten_tomatoes", "mnist"):
        full: Dataset = rotten_tomatoes() if spec == "rotten_tomatoes" else mnist_5k()
        data = full.subset(heldout_split(full)[1])
    elif Path(spec).suffix in (".pt", ".npz"):
        data = load_image_file(spec)
    elif Path(spec).is_dir():
        data = load_image_folder(spec, label_names=label_names)
    else:
        data = load_text_file(spec, label_names=label_names)
    if max_samples and len(data) > max_samples:
        data = data.subset(range(max_samples))
    return data


class HeldOutEvaluator:
    """Callable ``(state, config, label prior) -> {metric: value}`` for :class:`services.aggregator.versions.Versions`
    (the module's docstring lists the keys)."""

    def __init__(self, data: Dataset, tokenizer: Tokenizer | None, *, task: str = "sequence-classification",
                 fractions: Sequence[float] = (), seq_len: int = 64, batch_size: int = 64,
                 unlabelled: TextDataset | ImageDataset | None = None) -> None:
        if len(data) == 0:
            raise ValueError("the held-out evaluation data is empty")
        if isinstance(data, (TextDataset, InstructionDataset)) and tokenizer is None:
            raise ValueError("text evaluation data needs a tokenizer (the model folder has none)")
        bad = [f for f in fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"eval_fractions {bad} are out of range; each must be in (0, 1]")
        self.data, self.tokenizer, self.task = data, tokenizer, task
        self.fractions, self.seq_len, self.batch_size = tuple(fractions), seq_len, batch_size
        self.unlabelled = unlabelled  # each cut also matched to the full model on it; the model served on it

    def __call__(self, state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                 prior: torch.Tensor | None = None) -> dict[str, float]:
        from raffm.costs import CostModel
        from raffm.elastic import extract
        from raffm.models import model_from_state
        from raffm.scaling import CutMatcher, flops_fraction, spec_for_fraction
        from raffm.spec import ElasticSpec
        from raffm.threshold import fit_threshold

        model = model_from_state(dict(config), dict(state), task=self.task)  # type: ignore[arg-type]
        if isinstance(self.data, ImageDataset):
            self.data = self.data.fitted(model.config)  # a folder's images at the model's input size
        if isinstance(self.unlabelled, ImageDataset):
            self.unlabelled = self.unlabelled.fitted(model.config)
        out = self._scores(model, "")
        if self.fractions:
            cm = CostModel.from_model(model)
            full = ElasticSpec.full(cm.dims)
            total = cm.params(full)
            matcher = None
            for fraction in self.fractions:
                spec = spec_for_fraction(cm, fraction, seq_len=self.seq_len)
                label = size_label(fraction)
                cut = extract(model, spec)
                out.update(self._scores(cut, f"@{label}"))
                if self.unlabelled is not None and spec != full:
                    matcher = matcher or CutMatcher(model, self.unlabelled, self.tokenizer, seq_len=self.seq_len)
                    matcher(cut)
                    out[f"matched_accuracy@{label}"] = self._scores(cut, "")["accuracy"]
                out[f"params@{label}"] = cm.params(spec) / total
                out[f"flops@{label}"] = flops_fraction(cm, spec, seq_len=self.seq_len)
        if prior is not None and self.unlabelled is not None:  # last: it moves the model's output bias
            fit_threshold(model, self.unlabelled, self.tokenizer, prior, seq_len=self.seq_len)
            out.update({f"served_{k}": v for k, v in self._scores(model, "").items()})
        return out

    def _scores(self, model: Any, suffix: str) -> dict[str, float]:
        from raffm.generative import evaluate_generative
        from raffm.training import classification_scores

        if isinstance(self.data, InstructionDataset):
            scores = evaluate_generative(model, self.data, self.tokenizer, batch_size=self.batch_size,
                                         seq_len=self.seq_len)
            return {f"exact_match{suffix}": scores.exact_match, f"loss{suffix}": scores.loss}
        labelled = classification_scores(model, self.data, self.tokenizer, batch_size=self.batch_size,
                                         seq_len=self.seq_len)
        return {f"accuracy{suffix}": labelled.accuracy, f"balanced_accuracy{suffix}": labelled.balanced_accuracy}


def job_tokenizer(job: Any, setting: str) -> Tokenizer | None:
    """The tokenizer in the job's model folder (None for an image model); ``setting`` names the job setting that
    needs it, in the error."""
    if job.task not in ("sequence-classification", "causal-lm"):
        return None
    from transformers import AutoTokenizer

    from raffm.models import resolve_model

    path = resolve_model(job.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{setting} needs the tokenizer of model {path!r}, which could not be loaded: {exc}") from exc
    # A folder without tokenizer files still yields a tokenizer (only special tokens): every word is unknown.
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):
        raise ValueError(f"{setting} needs a tokenizer, but model folder {path!r} has none (no vocabulary "
                         "files); save the model's tokenizer next to it")
    return tokenizer


def default_evaluator(job: Any) -> HeldOutEvaluator | None:
    """The job's held-out evaluator, or None when ``eval_data`` is empty (evaluation off)."""
    if not job.eval_data:
        return None
    data = load_eval_data(job.eval_data, max_samples=job.eval_max_samples, task=job.task, label_names=job.labels)
    tokenizer = job_tokenizer(job, "eval_data")
    if not isinstance(data, InstructionDataset) and data.num_labels > job.num_labels:
        raise ValueError(f"eval_data {job.eval_data!r} has {data.num_labels} labels; the job's model has "
                         f"{job.num_labels} (num_labels)")
    unlabelled = None
    if job.distill_data and not isinstance(data, InstructionDataset):
        from services.aggregator.distillation import load_distill_data  # (it imports this module)

        unlabelled = load_distill_data(job.distill_data)
    log.info("held-out evaluation on %d examples of %s, sizes %s%s", len(data), job.eval_data,
             ["full", *map(size_label, job.eval_fractions)],
             f", served at the fleet's label prior{' and cuts matched to the full model' if job.eval_fractions else ''}"
             f" on {job.distill_data}" if unlabelled is not None else "")
    return HeldOutEvaluator(data, tokenizer, task=job.task, fractions=job.eval_fractions, seq_len=job.seq_len,
                            batch_size=max(job.batch_size, 32), unlabelled=unlabelled)
