"""The agent's local round stays within the declared --memory-mb: MiniLM, batch 16 x 64 tokens, the spec and recipe
the RaFFM strategy plans for each budget (with nested cuts: the recipe with the most to hold), peak RSS measured in a
fresh process (bench/bench_agent_memory.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from raffm.fitting import memory_budget_mb

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_agent_memory.py"


@pytest.mark.slow
def test_measured_training_peak_is_within_the_declared_budget() -> None:
    spec = importlib.util.spec_from_file_location("bench_agent_memory", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run([150, 250, 1500], steps=2, batch=16, seq=64, threads=None,
                     options={"nested_fractions": [0.25, 0.5, 0.75]})
    assert len({r["spec"] for r in rows}) == 3  # smaller budgets really get smaller sub-models
    assert any(r["checkpointing"] for r in rows) and any(r["nested"] for r in rows)
    for r in rows:
        assert r["measured_mb"] <= r["budget_mb"], r
        assert r["agent_predicted_mb"] <= r["budget_mb"], r
        # the prediction is honest: what it misses fits the fitter's margin, and it is not just generous either
        assert r["measured_mb"] <= memory_budget_mb(r["agent_predicted_mb"]), r
        assert r["agent_predicted_mb"] <= 1.10 * r["measured_mb"], r
