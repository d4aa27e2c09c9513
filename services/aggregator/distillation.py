"""The server's distillation step (strategy option ``server_distill_steps``): after every merge, the new version's cuts
learn its logits on unlabelled data the server holds (:func:`raffm.training.distill_cuts`).

The job's ``distill_data`` names that data: a CSV/JSON file of texts (a label column is never read), a
``.pt``/``.npz`` image file or a folder of images, or ``rotten_tomatoes`` / ``mnist`` (the built-in corpus's training
part: the kind of data the devices hold, never the test split the evaluator scores). Steps run at the strategy's
``server_distill_lr_scale`` x the job's learning rate, with its batch size and sequence length, seeded by the job's
seed and the round, so a round re-aggregated after a crash publishes the same version.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from raffm.data import ImageDataset, TextDataset, load_unlabelled
from raffm.strategy import Strategy
from raffm.training import LocalConfig, Tokenizer, distill_cuts, with_delta
from services.aggregator.evaluation import heldout_split, job_tokenizer

log = logging.getLogger(__name__)


def load_distill_data(spec: str) -> TextDataset | ImageDataset:
    """The unlabelled data named by a job's ``distill_data`` (a built-in corpus: its training part)."""
    data = load_unlabelled(spec)
    return data.subset(heldout_split(data)[0]) if spec in ("rotten_tomatoes", "mnist") else data


class ServerDistiller:
    """Callable ``(state, config, round) -> state`` for :class:`services.aggregator.versions.Versions`."""

    def __init__(self, data: TextDataset | ImageDataset, tokenizer: Tokenizer | None, strategy: Strategy, job: Any):
        if len(data) == 0:
            raise ValueError("the distillation data is empty")
        if isinstance(data, TextDataset) and tokenizer is None:
            raise ValueError("text distillation data needs a tokenizer (the model folder has none)")
        self.data, self.tokenizer, self.strategy, self.job = data, tokenizer, strategy, job

    def __call__(self, state: dict[str, torch.Tensor], config: Mapping[str, Any], round_index: int
                 ) -> dict[str, torch.Tensor]:
        from raffm.models import model_from_state
        from raffm.planning import cost_model_for

        job = self.job
        model = model_from_state(dict(config), dict(state), task=job.task)  # type: ignore[arg-type]
        if isinstance(self.data, ImageDataset):
            self.data = self.data.fitted(model.config)  # a folder's images at the model's input size
        settings = LocalConfig(batch_size=job.batch_size, seq_len=job.seq_len, lr=job.lr,
                               local_steps=self.strategy.server_distill_steps, weight_decay=job.weight_decay,
                               seed=job.seed * 100_003 + round_index)
        result = distill_cuts(model, self.data, self.tokenizer, settings,
                              recipe=self.strategy.server_distill_recipe(cost_model_for(dict(config))))
        log.info("round %d: server distillation, %d steps on %d examples, cuts' loss %.4f, %.1f s", round_index,
                 result.steps, result.samples, result.loss, result.seconds)
        return with_delta(state, result.delta)


def default_distiller(job: Any) -> ServerDistiller | None:
    """The job's server distillation step, or None when its strategy has none."""
    strategy = job.method()
    if not strategy.server_distill_steps:
        return None
    data = load_distill_data(job.distill_data)
    log.info("server distillation: %d steps a round on %d unlabelled examples of %s", strategy.server_distill_steps,
             len(data), job.distill_data)
    return ServerDistiller(data, job_tokenizer(job, "distill_data"), strategy, job)
