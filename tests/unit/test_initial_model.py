"""Version 0 of a job: a task head the pretrained model lacks is initialised from the job's seed."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertModel

from services.aggregator.app import default_initial_model
from services.aggregator.config import JobConfig
from tests.unit.toys import tiny_model


def test_the_job_seed_fixes_a_new_heads_init_and_nothing_else(tmp_path: Path) -> None:
    BertModel(tiny_model(0).config).save_pretrained(tmp_path)  # an encoder without a classification head
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, _ = default_initial_model(JobConfig(model=str(tmp_path), seed=0))()
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is left as it was
    again, _ = default_initial_model(JobConfig(model=str(tmp_path), seed=0))()
    other, _ = default_initial_model(JobConfig(model=str(tmp_path), seed=1))()
    assert torch.equal(first["classifier.weight"], again["classifier.weight"])
    assert not torch.equal(first["classifier.weight"], other["classifier.weight"])
    dense = "bert.encoder.layer.0.output.dense.weight"
    assert torch.equal(first[dense], other[dense])  # the pretrained weights are the pretrained weights
