"""bench/bench_threshold.py's offsets: each label is predicted as often as the prior says, on their inputs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_threshold.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_threshold_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shift", [-3.0, 0.0, 5.0])
def test_two_labels_get_the_prior_threshold(bench: Any, shift: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(1000, 2) * torch.tensor([1.0, 2.0]) + torch.tensor([0.0, shift])
    offsets = bench.prior_offsets(logits, torch.tensor([0.42, 0.58]))
    margin = logits[:, 1] - logits[:, 0]
    assert ((margin + offsets[1] - offsets[0]) > 0).float().mean().item() == pytest.approx(0.58, abs=2e-3)
    # the same threshold as the margin's quantile, whatever the model's own bias was
    assert float(offsets[1] - offsets[0]) == pytest.approx(-float(torch.quantile(margin, 0.42)), abs=0.05)


def test_many_labels_get_their_shares(bench: Any) -> None:
    torch.manual_seed(1)
    logits = torch.randn(3000, 4) * 3 + torch.tensor([2.0, 0.0, 0.0, -2.0])
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    offsets = bench.prior_offsets(logits, prior)
    shares = torch.bincount((logits + offsets).argmax(-1), minlength=4).float() / len(logits)
    assert torch.allclose(shares, prior, atol=5e-3)
    assert abs(float(offsets.sum())) < 1e-4
