"""Sliced FedAvg: coverage-weighted means, the paper rule, rejections, order independence, checkpoints.

References are computed independently of the aggregator: each client's delta is zero-filled to the global shape
with ``scatter`` and its coverage taken with ``coverage_mask``, then the formulas are applied on whole tensors in
float64. One small synthetic case is checked against element-by-element loops written out by hand.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel, ViTConfig, ViTForImageClassification

from raffm.aggregation import REJECTION_REASONS, SlicedFedAvg, UpdateRejected, sliced_fedavg
from raffm.arch import adapter_for
from raffm.elastic import plan_for
from raffm.slicing import SlicePlan, TensorSlice, coverage_mask, scatter
from raffm.spec import ElasticSpec, LayerSpec, ModelDims

State = dict[str, torch.Tensor]
Update = tuple[State, SlicePlan, float]


def _bert() -> PreTrainedModel:
    torch.manual_seed(0)
    sizes: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 vocab_size=100, max_position_embeddings=32, num_labels=3)
    config = BertConfig(**sizes)
    return BertForSequenceClassification(config)


BERT = _bert()
DIMS = adapter_for(BERT).dims(BERT.config)
GLOBAL: State = {name: t.clone() for name, t in BERT.state_dict().items()}


def _layer(dims: ModelDims, frac: float) -> LayerSpec:
    return LayerSpec(max(1, round(dims.heads * frac)), max(1, round(dims.head_dim * frac)), max(1, round(dims.ffn * frac)))


def sized_spec(dims: ModelDims, frac: float, depth: int | None = None) -> ElasticSpec:
    """A uniform spec keeping about ``frac`` of every width."""
    return ElasticSpec(hidden=max(1, round(dims.hidden * frac)), layers=(_layer(dims, frac),) * (depth or dims.layers))


SPECS = [ElasticSpec.full(DIMS), sized_spec(DIMS, 0.75), sized_spec(DIMS, 0.5, depth=1), sized_spec(DIMS, 0.25)]


@st.composite
def specs(draw: st.DrawFn, dims: ModelDims = DIMS) -> ElasticSpec:
    depth = draw(st.integers(1, dims.layers))
    layers = tuple(
        LayerSpec(draw(st.integers(1, dims.heads)), draw(st.integers(1, dims.head_dim)), draw(st.integers(1, dims.ffn)))
        for _ in range(depth)
    )
    return ElasticSpec(hidden=draw(st.integers(1, dims.hidden)), layers=layers)


def random_delta(plan: SlicePlan, seed: int, dtype: torch.dtype = torch.float32) -> State:
    gen = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(s.sub_shape, generator=gen) * 1e-2).to(dtype) for name, s in plan.items()}


def snapshot(state: Mapping[str, torch.Tensor]) -> State:
    return {name: t.clone() for name, t in state.items()}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (tells -0.0 from 0.0 and compares NaN payloads), not just ==."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(int_type), b.contiguous().view(int_type))
    return torch.equal(a, b)


def states_bits_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(bits_equal(a[n], b[n]) for n in a)


def reference(global_state: State, updates: Sequence[Update], *, mode: str, server_lr: float = 1.0) -> State:
    """The aggregation formulas on zero-filled full tensors and coverage masks, in float64."""
    out: State = {}
    for name, old in global_state.items():
        num = torch.zeros(old.shape, dtype=torch.float64)
        den = torch.zeros(old.shape, dtype=torch.float64)
        for delta, plan, weight in updates:
            if name not in plan:
                continue
            zero_filled = scatter({name: torch.zeros(old.shape)}, {name: delta[name].float()}, plan)[name].double()
            mask = coverage_mask(plan[name]).double()
            w = weight if mode == "coverage" else 1.0
            num += w * zero_filled
            den += w * mask
        if mode == "coverage":
            mean = num / den.clamp_min(1e-300)
        else:
            mean = num / max(len(updates), 1)
        new = (old.double() + server_lr * mean).to(old.dtype)
        out[name] = torch.where(den > 0, new, old)
    return out


def fold_all(global_state: State, updates: Sequence[Update], **kwargs: object) -> SlicedFedAvg:
    agg = SlicedFedAvg(global_state, **kwargs)  # type: ignore[arg-type]
    for delta, plan, weight in updates:
        agg.fold(delta, plan, weight)
    return agg


def assert_close_states(got: State, want: State, *, atol: float = 1e-7, rtol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# -- the coverage rule ---------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(client_specs=st.lists(specs(), min_size=1, max_size=5), weights=st.lists(st.integers(1, 5000), min_size=5, max_size=5),
       seed=st.integers(0, 2**31 - 1))
def test_identical_deltas_give_exactly_that_delta(client_specs: list[ElasticSpec], weights: list[int], seed: int) -> None:
    # Every client uploads its slice of one global-shaped delta D: every covered element's mean is D there, exactly.
    gen = torch.Generator().manual_seed(seed)
    full = {name: torch.randn(t.shape, generator=gen) * 1e-2 for name, t in GLOBAL.items()}
    updates: list[Update] = []
    for spec, weight in zip(client_specs, weights):
        plan = plan_for(BERT, spec)
        updates.append(({name: s.take(full[name]) for name, s in plan.items()}, plan, float(weight)))
    got = fold_all(GLOBAL, updates).result()
    for name, old in GLOBAL.items():
        covered = torch.zeros(old.shape, dtype=torch.bool)
        for _, plan, _ in updates:
            if name in plan:
                covered |= coverage_mask(plan[name])
        assert bits_equal(got[name], torch.where(covered, old + full[name], old)), name


def test_same_delta_same_spec_from_many_clients() -> None:
    plan = plan_for(BERT, SPECS[1])
    delta = random_delta(plan, seed=3)
    got = fold_all(GLOBAL, [(delta, plan, float(w)) for w in (1, 7, 100, 3, 12345)]).result()
    expected = snapshot(GLOBAL)
    for name, s in plan.items():
        s.block(expected[name]).add_(delta[name].reshape(s.keep))  # old + delta, in float32, on the slice only
    assert states_bits_equal(got, expected)


def test_a_single_covering_client_gives_exactly_its_delta() -> None:
    # The full-spec client is the only one covering the elements outside the smaller slices.
    plans = [plan_for(BERT, spec) for spec in SPECS]
    updates = [(random_delta(plan, seed=i), plan, float(10 + 7 * i)) for i, plan in enumerate(plans)]
    got = fold_all(GLOBAL, updates).result()
    big_delta, big_plan, _ = updates[0]
    checked = 0
    for name, old in GLOBAL.items():
        only_big = coverage_mask(big_plan[name])
        for _, plan, _ in updates[1:]:
            if name in plan:
                only_big &= ~coverage_mask(plan[name])
        zero_filled = scatter({name: torch.zeros_like(old)}, {name: big_delta[name]}, big_plan)[name]
        expected = old + zero_filled
        assert bits_equal(got[name][only_big], expected[only_big]), name
        checked += int(only_big.sum())
    assert checked > 0.3 * sum(t.numel() for t in GLOBAL.values())


@pytest.mark.parametrize("mode", ["coverage", "paper"])
def test_uncovered_elements_are_bit_identical(mode: str) -> None:
    # Negative zeros and odd values in the global state must survive untouched where nobody trained.
    state = snapshot(GLOBAL)
    for t in state.values():
        t.view(-1)[-1] = -0.0
        t.view(-1)[0] = 1e-38
    plans = [plan_for(BERT, SPECS[2]), plan_for(BERT, sized_spec(DIMS, 0.25, depth=1))]  # layer 1 is dropped
    updates = [(random_delta(plan, seed=i), plan, 5.0) for i, plan in enumerate(plans)]
    got = fold_all(state, updates, mode=mode).result()
    dropped = [n for n in state if n not in plans[0] and n not in plans[1]]
    assert dropped, "the specs should drop a layer"
    for name, old in state.items():
        covered = torch.zeros(old.shape, dtype=torch.bool)
        for plan in plans:
            if name in plan:
                covered |= coverage_mask(plan[name])
        assert bits_equal(got[name][~covered], old[~covered]), name
    for name in dropped:
        assert bits_equal(got[name], state[name]), name


@settings(max_examples=20, deadline=None)
@given(client_specs=st.lists(specs(), min_size=1, max_size=4), weights=st.lists(st.integers(1, 10**6), min_size=4, max_size=4),
       seed=st.integers(0, 2**31 - 1), accum=st.sampled_from([torch.float64, torch.float32]))
def test_weights_follow_sample_counts(
    client_specs: list[ElasticSpec], weights: list[int], seed: int, accum: torch.dtype
) -> None:
    updates: list[Update] = []
    for i, (spec, weight) in enumerate(zip(client_specs, weights)):
        plan = plan_for(BERT, spec)
        updates.append((random_delta(plan, seed + i), plan, float(weight)))
    got = fold_all(GLOBAL, updates, accum_dtype=accum).result()
    assert_close_states(got, reference(GLOBAL, updates, mode="coverage"))


def test_weights_matter() -> None:
    # Guard against a silently unweighted mean: the same updates with swapped weights differ, as the formula says.
    plans = [plan_for(BERT, SPECS[0]), plan_for(BERT, SPECS[1])]
    deltas = [random_delta(p, seed=i) for i, p in enumerate(plans)]
    a = [(deltas[0], plans[0], 1.0), (deltas[1], plans[1], 9.0)]
    b = [(deltas[0], plans[0], 9.0), (deltas[1], plans[1], 1.0)]
    got_a, got_b = fold_all(GLOBAL, a).result(), fold_all(GLOBAL, b).result()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(got_a[name], got_b[name])
    assert_close_states(got_a, reference(GLOBAL, a, mode="coverage"))
    assert_close_states(got_b, reference(GLOBAL, b, mode="coverage"))


def test_hand_computed_per_head_slices() -> None:
    # A [heads*head_dim, in] = [2*3, 2] query-like tensor and a [4] vector; element-by-element expectations.
    old = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    vec = torch.full((4,), 10.0)
    state = {"w": old, "v": vec, "steps": torch.tensor([7], dtype=torch.int64)}
    # Client A keeps 2 heads x 1 dim x 2 inputs (rows 0 and 3); client B keeps 1 head x 3 dims x 1 input.
    plan_a = {"w": TensorSlice((6, 2), (2, 3, 2), (2, 1, 2), (2, 2)), "v": TensorSlice((4,), (4,), (3,), (3,))}
    plan_b = {"w": TensorSlice((6, 2), (2, 3, 2), (1, 3, 1), (3, 1)), "v": TensorSlice((4,), (4,), (1,), (1,))}
    delta_a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "v": torch.tensor([1.0, 1.0, 1.0])}
    delta_b = {"w": torch.tensor([[10.0], [20.0], [30.0]]), "v": torch.tensor([5.0])}
    wa, wb = 1.0, 3.0
    got = fold_all(state, [(delta_a, plan_a, wa), (delta_b, plan_b, wb)], server_lr=0.5).result()

    expected = old.clone()
    a_rows = {0: 0, 3: 1}  # global row -> client A row
    for r in range(6):
        for c in range(2):
            contributions = []
            if r in a_rows:
                contributions.append((wa, delta_a["w"][a_rows[r], c].item()))
            if r < 3 and c == 0:
                contributions.append((wb, delta_b["w"][r, 0].item()))
            if contributions:
                mean = sum(w * d for w, d in contributions) / sum(w for w, _ in contributions)
                expected[r, c] = old[r, c] + 0.5 * mean
    assert torch.allclose(got["w"], expected, rtol=0, atol=1e-6)
    assert expected[0, 0].item() == pytest.approx(0.0 + 0.5 * (1 * 1 + 3 * 10) / 4)
    assert got["w"][5, 1].item() == 11.0  # row 5 (head 1, dim 2), input 1: nobody covers it
    assert torch.allclose(got["v"], torch.tensor([10 + 0.5 * (1 + 15) / 4, 10.5, 10.5, 10.0]))
    assert bits_equal(got["steps"], state["steps"])


def test_server_lr_scales_the_step() -> None:
    plans = [plan_for(BERT, spec) for spec in SPECS]
    updates = [(random_delta(p, seed=i), p, float(i + 1)) for i, p in enumerate(plans)]
    for mode in ("coverage", "paper"):
        base = fold_all(GLOBAL, updates, mode=mode).result()
        scaled = fold_all(GLOBAL, updates, mode=mode, server_lr=0.25).result()
        assert_close_states(scaled, reference(GLOBAL, updates, mode=mode, server_lr=0.25))
        for name, old in GLOBAL.items():
            torch.testing.assert_close(scaled[name] - old, 0.25 * (base[name] - old), atol=1e-7, rtol=1e-4)


# -- the paper rule ------------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(client_specs=st.lists(specs(), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_paper_mode_matches_its_formula(client_specs: list[ElasticSpec], seed: int) -> None:
    updates: list[Update] = []
    for i, spec in enumerate(client_specs):
        plan = plan_for(BERT, spec)
        updates.append((random_delta(plan, seed + i), plan, float(10 * (i + 1))))  # weights are ignored
    got = fold_all(GLOBAL, updates, mode="paper").result()
    assert_close_states(got, reference(GLOBAL, updates, mode="paper"))


def test_paper_mode_shrinks_small_slices_and_differs_from_coverage() -> None:
    plans = [plan_for(BERT, SPECS[0]), plan_for(BERT, SPECS[3])]
    full = {name: torch.ones(t.shape) for name, t in GLOBAL.items()}
    updates = [({n: s.take(full[n]) for n, s in p.items()}, p, 1.0) for p in plans]
    paper = fold_all(GLOBAL, updates, mode="paper").result()
    coverage = fold_all(GLOBAL, updates).result()
    name = "bert.encoder.layer.0.intermediate.dense.bias"
    # Element 0 is covered by both clients, the last only by the full one: coverage gives +1 for both,
    # the paper rule +1 and +1/2.
    assert coverage[name][0] == GLOBAL[name][0] + 1 and coverage[name][-1] == GLOBAL[name][-1] + 1
    assert paper[name][0] == GLOBAL[name][0] + 1 and paper[name][-1] == GLOBAL[name][-1] + 0.5


# -- rejections ----------------------------------------------------------------------------------------------------

LAST = list(plan_for(BERT, SPECS[1]))[-1]  # bad values go in the last tensor: nothing may be folded before the check


def _bad_update(kind: str, delta: State, plan: SlicePlan) -> tuple[State, float, torch.dtype, str]:
    """(delta, weight, dtype, text the message must contain) for one rejection kind."""
    bad = dict(delta)
    if kind == "unknown_tensor":
        bad["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(2, 2)
        return bad, 1.0, torch.float32, "layer.9"
    if kind == "missing_tensor":
        del bad[LAST]
        return bad, 1.0, torch.float32, LAST
    if kind == "shape":
        bad[LAST] = torch.zeros(*plan[LAST].sub_shape[:-1], plan[LAST].sub_shape[-1] + 1)
        return bad, 1.0, torch.float32, str(plan[LAST].sub_shape)
    if kind == "dtype":
        bad[LAST] = bad[LAST].double()
        return bad, 1.0, torch.float32, "float64"
    if kind == "dtype_not_a_tensor":
        bad[LAST] = bad[LAST].tolist()  # type: ignore[assignment]
        return bad, 1.0, torch.float32, "list"
    if kind == "dtype_wire":
        return bad, 1.0, torch.float16, "float16"  # float32 tensors where the job's wire dtype is fp16
    if kind.startswith("non_finite"):
        value = {"non_finite_nan": math.nan, "non_finite_inf": math.inf, "non_finite_ninf": -math.inf}[kind]
        bad[LAST] = bad[LAST].clone()
        bad[LAST].view(-1)[-1] = value
        return bad, 1.0, torch.float32, LAST
    if kind.startswith("weight"):
        weight = {"weight_zero": 0.0, "weight_negative": -3.0, "weight_nan": math.nan, "weight_inf": math.inf}[kind]
        return bad, weight, torch.float32, "weight"
    raise AssertionError(kind)


REJECTION_CASES = [
    "unknown_tensor", "missing_tensor", "shape", "dtype", "dtype_not_a_tensor", "dtype_wire",
    "non_finite_nan", "non_finite_inf", "non_finite_ninf", "weight_zero", "weight_negative", "weight_nan", "weight_inf",
]


@pytest.mark.parametrize("mode", ["coverage", "paper"])
@pytest.mark.parametrize("kind", REJECTION_CASES)
def test_rejections_name_the_problem_and_leave_sums_untouched(kind: str, mode: str) -> None:
    plan = plan_for(BERT, SPECS[1])
    agg = SlicedFedAvg(GLOBAL, mode=mode)  # type: ignore[arg-type]
    agg.fold(random_delta(plan, seed=1), plan, 4.0)
    before_result, before_state = agg.result(), agg.state_dict()
    bad, weight, dtype, needle = _bad_update(kind, random_delta(plan, seed=2), plan)
    with pytest.raises(UpdateRejected) as info:
        agg.fold(bad, plan, weight, dtype=dtype)
    reason = kind.split("_")[0] if kind.startswith(("dtype", "weight")) else kind
    reason = "non_finite" if kind.startswith("non_finite") else reason
    assert info.value.reason == reason and reason in REJECTION_REASONS
    assert needle in str(info.value)
    assert agg.participants == 1 and agg.total_weight == 4.0
    assert states_bits_equal(agg.result(), before_result)
    assert states_bits_equal(agg.state_dict()["sums"], before_state["sums"])
    assert agg.state_dict()["cover"] == before_state["cover"]


def test_validate_alone_never_folds() -> None:
    plan = plan_for(BERT, SPECS[2])
    agg = SlicedFedAvg(GLOBAL)
    agg.validate(random_delta(plan, seed=0), plan, 3)
    assert agg.participants == 0 and states_bits_equal(agg.result(), GLOBAL)


def test_bool_weight_is_rejected() -> None:
    plan = plan_for(BERT, SPECS[3])
    with pytest.raises(UpdateRejected, match="weight") as info:
        SlicedFedAvg(GLOBAL).fold(random_delta(plan, seed=0), plan, True)  # type: ignore[arg-type]
    assert info.value.reason == "weight"


def test_integer_tensors_are_never_averaged() -> None:
    state = {"w": torch.zeros(4), "count": torch.tensor([3, 4], dtype=torch.int64), "flag": torch.tensor([True])}
    plan = {"w": TensorSlice((4,), (4,), (2,), (2,)), "count": TensorSlice((2,), (2,), (2,), (2,))}
    agg = SlicedFedAvg(state)
    with pytest.raises(UpdateRejected, match="never aggregated") as info:
        agg.fold({"w": torch.ones(2), "count": torch.ones(2)}, plan, 1.0)
    assert info.value.reason == "unknown_tensor"
    agg.fold({"w": torch.ones(2)}, plan, 1.0)  # the integer tensor is not expected from the client
    got = agg.result()
    assert torch.equal(got["w"], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert bits_equal(got["count"], state["count"]) and bits_equal(got["flag"], state["flag"])


def test_a_plan_that_does_not_fit_the_global_state_is_a_server_error() -> None:
    plan = {"w": TensorSlice((5,), (5,), (2,), (2,))}
    with pytest.raises(ValueError, match=r"shape \(5,\)") as info:
        SlicedFedAvg({"w": torch.zeros(4)}).fold({"w": torch.ones(2)}, plan, 1.0)
    assert not isinstance(info.value, UpdateRejected)
    with pytest.raises(ValueError, match="'x'"):
        SlicedFedAvg({"w": torch.zeros(4)}).fold({"x": torch.ones(2)}, {"x": TensorSlice((4,), (4,), (2,), (2,))}, 1.0)


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"mode": "mean"}, "mode"), ({"server_lr": 0.0}, "server_lr"), ({"server_lr": math.nan}, "server_lr"),
     ({"accum_dtype": torch.float16}, "accum_dtype")],
)
def test_bad_settings_are_refused(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        SlicedFedAvg(GLOBAL, **kwargs)  # type: ignore[arg-type]


# -- order, purity, checkpoints ------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(order=st.permutations(range(4)), mode=st.sampled_from(["coverage", "paper"]),
       accum=st.sampled_from([torch.float64, torch.float32]))
def test_fold_order_does_not_matter(order: list[int], mode: str, accum: torch.dtype) -> None:
    updates = [(random_delta(plan_for(BERT, s), seed=i), plan_for(BERT, s), float(3 * i + 1)) for i, s in enumerate(SPECS)]
    forward = fold_all(GLOBAL, updates, mode=mode, accum_dtype=accum).result()
    shuffled = fold_all(GLOBAL, [updates[i] for i in order], mode=mode, accum_dtype=accum).result()
    assert_close_states(shuffled, forward, atol=1e-7, rtol=1e-6)


def test_result_and_fold_do_not_mutate_inputs() -> None:
    plans = [plan_for(BERT, s) for s in SPECS]
    deltas = [random_delta(p, seed=i) for i, p in enumerate(plans)]
    global_before, deltas_before = snapshot(GLOBAL), [snapshot(d) for d in deltas]
    agg = fold_all(GLOBAL, [(d, p, 2.0) for d, p in zip(deltas, plans)])
    first = agg.result()
    assert states_bits_equal(GLOBAL, global_before)
    assert all(states_bits_equal(d, b) for d, b in zip(deltas, deltas_before))
    assert states_bits_equal(agg.result(), first)  # result() is repeatable
    first["bert.pooler.dense.bias"].add_(1.0)  # and returns fresh tensors
    assert states_bits_equal(GLOBAL, global_before)


def test_no_participants_returns_a_copy() -> None:
    got = SlicedFedAvg(GLOBAL).result()
    assert states_bits_equal(got, GLOBAL)
    assert all(got[n].data_ptr() != GLOBAL[n].data_ptr() for n in GLOBAL)


def test_state_dict_round_trip_and_deterministic_refold() -> None:
    plans = [plan_for(BERT, s) for s in SPECS]
    updates = [(random_delta(p, seed=i), p, float(i + 2)) for i, p in enumerate(plans)]
    agg = fold_all(GLOBAL, updates[:2])
    buffer = io.BytesIO()
    torch.save(agg.state_dict(), buffer)
    buffer.seek(0)
    restored = SlicedFedAvg(GLOBAL)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.participants == 2 and restored.total_weight == 5.0
    for a in (agg, restored):
        for delta, plan, weight in updates[2:]:
            a.fold(delta, plan, weight)
    assert states_bits_equal(restored.result(), agg.result())
    # Re-folding the same accepted updates in the same order rebuilds the same sums, bit for bit.
    assert states_bits_equal(fold_all(GLOBAL, updates).state_dict()["sums"], agg.state_dict()["sums"])
    with pytest.raises(ValueError, match="mode"):
        SlicedFedAvg(GLOBAL, mode="paper").load_state_dict(agg.state_dict())
    with pytest.raises(ValueError, match="tensors differ"):
        SlicedFedAvg({"w": torch.zeros(3)}).load_state_dict(agg.state_dict())


def test_wire_dtypes_and_one_shot_helper() -> None:
    plans = [plan_for(BERT, s) for s in SPECS[1:]]
    updates16 = [(random_delta(p, seed=i, dtype=torch.bfloat16), p, float(i + 1)) for i, p in enumerate(plans)]
    got = sliced_fedavg(GLOBAL, updates16, dtype=torch.bfloat16)
    assert_close_states(got, reference(GLOBAL, updates16, mode="coverage"))
    assert all(got[n].dtype == GLOBAL[n].dtype for n in GLOBAL)


def test_vit_slices_aggregate_too() -> None:
    torch.manual_seed(0)
    sizes: dict[str, Any] = dict(image_size=28, patch_size=7, num_channels=1, num_labels=10, hidden_size=48,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    model = ViTForImageClassification(ViTConfig(**sizes))
    dims = adapter_for(model).dims(model.config)
    state = snapshot(model.state_dict())
    updates = [(random_delta(p, seed=i), p, float(5 - i)) for i, p in
               enumerate(plan_for(model, s) for s in (ElasticSpec.full(dims), sized_spec(dims, 0.5, depth=1)))]
    assert_close_states(fold_all(state, updates).result(), reference(state, updates, mode="coverage"))


@pytest.mark.parametrize("chunk", [5, 64, 1000])
def test_converting_fold_in_small_chunks_matches_the_formula(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # fp16 deltas into float64 sums go through the chunked conversion; tiny chunks force every split path
    # (several leading rows per chunk, and rows larger than a chunk).
    monkeypatch.setattr("raffm.aggregation._CHUNK", chunk)
    plans = [plan_for(BERT, s) for s in SPECS]
    updates = [(random_delta(p, seed=i, dtype=torch.float16), p, float(2 * i + 1)) for i, p in enumerate(plans)]
    agg = SlicedFedAvg(GLOBAL)
    for delta, plan, weight in updates:
        agg.fold(delta, plan, weight, dtype=torch.float16)
    assert_close_states(agg.result(), reference(GLOBAL, updates, mode="coverage"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "huge"])
def test_finiteness_check_is_exact_at_any_position(dtype: torch.dtype, value: float | str) -> None:
    # validate() checks finiteness with one sum per tensor; a sum that overflows on finite values (two elements at
    # 3/4 of the dtype's maximum) must fall back to an exact check and accept, and a NaN or infinity anywhere
    # (first element, inside a vector lane, the scalar tail) must be rejected.
    plan = plan_for(BERT, SPECS[1])
    agg = SlicedFedAvg(GLOBAL)
    name = max(plan, key=lambda n: plan[n].numel)
    for position in (0, 5, 17, 1000, -3, -1):
        bad = random_delta(plan, seed=4, dtype=dtype)
        tensor = bad[name].clone()
        flat = tensor.view(-1)
        if value == "huge":
            flat[position] = flat[(position + 1) % flat.numel()] = torch.finfo(dtype).max * 0.75
        else:
            flat[position] = value
        bad[name] = tensor
        if value == "huge":
            agg.validate(bad, plan, 2.0, dtype=dtype)
        else:
            with pytest.raises(UpdateRejected, match=name) as info:
                agg.validate(bad, plan, 2.0, dtype=dtype)
            assert info.value.reason == "non_finite"


def test_fold_after_load_state_dict_goes_into_the_restored_sums() -> None:
    # The fold caches views of the running sums per slice; restoring a checkpoint replaces the sums.
    plans = [plan_for(BERT, s) for s in SPECS]
    updates = [(random_delta(p, seed=i), p, float(i + 2)) for i, p in enumerate(plans)]
    saved = fold_all(GLOBAL, updates[:1]).state_dict()
    agg = fold_all(GLOBAL, updates[:3])  # its views of the sums are cached now
    agg.load_state_dict(saved)
    for delta, plan, weight in updates[1:]:
        agg.fold(delta, plan, weight)
    assert states_bits_equal(agg.result(), fold_all(GLOBAL, updates).result())


@pytest.mark.parametrize("wire", [torch.float32, torch.float16])
def test_multi_tensor_and_chunked_converting_folds_agree_bit_for_bit(wire: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small deltas go through one multi-tensor add_ (converting through a temporary when the dtypes differ), big ones
    # through the chunked conversion: both must build the same float64 sums, so the split point changes nothing.
    plans = [plan_for(BERT, s) for s in SPECS]
    updates = [(random_delta(p, seed=i, dtype=wire), p, float(3 * i + 1)) for i, p in enumerate(plans)]
    sums = []
    for small, chunk in ((0, 1000), (1 << 30, 1000), (1 << 14, 1 << 18)):
        monkeypatch.setattr("raffm.aggregation._SMALL", small)
        monkeypatch.setattr("raffm.aggregation._CHUNK", chunk)
        agg = SlicedFedAvg(GLOBAL)
        for delta, plan, weight in updates:
            agg.fold(delta, plan, weight, dtype=wire)
        sums.append(agg.state_dict()["sums"])
    assert states_bits_equal(sums[0], sums[1]) and states_bits_equal(sums[0], sums[2])


def test_a_fold_told_its_update_is_validated_adds_the_same_bits_without_a_second_check() -> None:
    """The aggregator validates an upload before it takes its lock and folds it under the lock with
    ``validated=True``: the sums must be exactly those of a validating fold, and that fold must not check again
    (a NaN goes in, which is why only a caller that ran validate may say so)."""
    plan = plan_for(BERT, SPECS[1])
    deltas = [random_delta(plan, seed=s) for s in (1, 2)]
    checked, unchecked = SlicedFedAvg(GLOBAL), SlicedFedAvg(GLOBAL)
    for weight, delta in zip((3.0, 5.0), deltas):
        checked.validate(delta, plan, weight)
        checked.fold(delta, plan, weight, validated=True)
        unchecked.fold(delta, plan, weight)
    assert states_bits_equal(checked.state_dict()["sums"], unchecked.state_dict()["sums"])
    assert states_bits_equal(checked.result(), unchecked.result())
    poisoned = {n: torch.full_like(t, float("nan")) for n, t in deltas[0].items()}
    checked.fold(poisoned, plan, 1.0, validated=True)
    assert checked.participants == 3
