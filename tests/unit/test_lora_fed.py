"""Federated LoRA with heterogeneous ranks and heterogeneous slices (raffm.lora_fed): the aggregate is the coverage-
weighted mean of the devices' products, SVD redistribution is exact at enough rank, a round moves only adapters."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from raffm.aggregation import UpdateRejected
from raffm.arch import canonical_shapes
from raffm.elastic import extract, plan_for
from raffm.lora import LoRAConfig, adapter_state, apply_lora, load_adapters, merge_lora, trainable_parameters
from raffm.lora_fed import (
    LoRAFedAvg,
    factors,
    init_global_update,
    lora_update,
    merge_update,
    redistribute,
    round_bytes,
    truncation_error,
)
from raffm.slicing import SlicePlan, coverage_mask
from raffm.spec import ElasticSpec
from tests.unit.test_lora import LLAMA_T, SMALL, dims_of, ids, llama, logits


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


Adapters = dict[str, torch.Tensor]


def _client(u: Adapters, plan: SlicePlan, rank: int, scaling: float, seed: int) -> tuple[Adapters, Adapters]:
    """(start adapters from the server, 'trained' adapters: start plus a random step)."""
    start = redistribute(u, plan, rank, scaling, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(100 + seed)
    trained = {n: t + 0.1 * torch.randn(t.shape, generator=gen) for n, t in start.items()}
    return start, trained


def _products(adapters: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    return {n: scaling * (b.double() @ a.double()) for n, (b, a) in factors(adapters).items()}


def test_equal_rank_clients_aggregate_to_the_mean_of_their_products_not_of_their_factors() -> None:
    model = llama()
    u0 = init_global_update(model.state_dict(), LLAMA_T)
    plan = plan_for(model, ElasticSpec.full(dims_of(model)))
    weights, scaling = [3, 1, 2], 2.0
    clients = [_client(u0, plan, 4, scaling, seed) for seed in range(3)]
    agg = LoRAFedAvg(u0)
    for (start, trained), w in zip(clients, weights):
        agg.fold(start, trained, plan, w, scaling=scaling)
    new = agg.result()
    products = [_products(trained, scaling) for _, trained in clients]  # round one: the start products are zero
    for name in u0:
        mean = sum(w * p[name] for w, p in zip(weights, products)) / sum(weights)
        assert (new[name].double() - mean).abs().max() <= 1e-6, name
        # the naive rule (average B and A separately, then multiply) is measurably different
        fb = [factors(t)[name] for _, t in clients]
        share = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        mean_b = torch.einsum("c,cor->or", share, torch.stack([b.double() for b, _ in fb]))
        mean_a = torch.einsum("c,cri->ri", share, torch.stack([a.double() for _, a in fb]))
        naive = scaling * mean_b @ mean_a
        assert (naive - mean).abs().max() > 1e-3


def _low_rank_update(model: PreTrainedModel, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = init_global_update(model.state_dict(), LLAMA_T)
    return {n: (torch.randn(t.shape[0], rank, generator=gen) @ torch.randn(rank, t.shape[1], generator=gen)) * 0.01
            for n, t in u.items()}


def test_svd_redistribution_reproduces_the_update_at_enough_rank_and_truncates_to_the_tail() -> None:
    model = llama()
    u = _low_rank_update(model, rank=3)
    for spec in (ElasticSpec.full(dims_of(model)), SMALL):
        plan = plan_for(model, spec)
        for rank, scaling in ((3, 1.0), (8, 0.5)):  # rank >= the true rank: exact, with any scaling
            got = _products(redistribute(u, plan, rank, scaling, generator=torch.Generator().manual_seed(0)), scaling)
            for name, p in got.items():
                assert (p - plan[name].take(u[name]).double()).abs().max() <= 1e-6, (name, rank)
        errors = truncation_error(u, plan, rank=2)
        got = _products(redistribute(u, plan, 2, 2.0), 2.0)
        for name, p in got.items():
            block = plan[name].take(u[name]).double()
            sv = torch.linalg.svdvals(block)
            assert math.isclose(errors[name], float(sv[2:].square().sum().sqrt()), rel_tol=1e-9)
            assert math.isclose(float((block - p).norm()), errors[name], rel_tol=1e-4), name
            assert errors[name] > 0


def test_zero_update_redistributes_to_zero_b_and_random_a_so_training_can_start() -> None:
    model = llama()
    plan = plan_for(model, SMALL)
    start = redistribute(init_global_update(model.state_dict(), LLAMA_T), plan, 4, 1.0,
                         generator=torch.Generator().manual_seed(0))
    for name, t in start.items():
        assert (t == 0).all() if name.endswith("lora_B") else (t != 0).all()


def test_a_sliced_client_update_lands_only_on_its_slice_and_overlaps_are_coverage_weighted() -> None:
    model = llama()
    dims = dims_of(model)
    u = _low_rank_update(model, rank=2)
    full, small = plan_for(model, ElasticSpec.full(dims)), plan_for(model, SMALL)
    big_client, small_client = _client(u, full, 6, 1.0, seed=1), _client(u, small, 2, 4.0, seed=2)

    alone = LoRAFedAvg(u)
    alone.fold(*small_client, small, 5, scaling=4.0)
    only_small = alone.result()
    d_small = lora_update(*small_client, small, 4.0)
    for name in u:
        mask = coverage_mask(small[name])
        assert torch.equal(only_small[name][~mask], u[name][~mask])  # bit for bit outside the slice
        assert (only_small[name] - u[name])[mask].abs().max() > 0
        assert torch.allclose(small[name].take(only_small[name]), small[name].take(u[name]) + d_small[name], atol=1e-6)

    both = LoRAFedAvg(u)
    both.fold(*big_client, full, 1, scaling=1.0)
    both.fold(*small_client, small, 3, scaling=4.0)
    new = both.result()
    d_big = lora_update(*big_client, full, 1.0)
    for name in u:
        expected = u[name] + d_big[name]  # only the big client covers the rest
        inside = small[name].take(u[name]) + (small[name].take(d_big[name]) + 3 * d_small[name]) / 4
        small[name].put(expected, inside)
        assert torch.allclose(new[name], expected, atol=1e-6), name
    assert sum(int((~coverage_mask(small[n])).sum()) for n in u) > 0  # the overlap test is not vacuous


def test_a_low_rank_client_that_learned_nothing_does_not_erase_what_its_rank_cannot_carry() -> None:
    model = llama()
    u = _low_rank_update(model, rank=6)
    plan = plan_for(model, SMALL)
    start = redistribute(u, plan, 2, 1.0)  # rank 2 < 6: the download is truncated
    assert all(e > 0 for e in truncation_error(u, plan, 2).values())
    agg = LoRAFedAvg(u)
    agg.fold(start, start, plan, 1, scaling=1.0)  # uploads what it was sent
    for name, new in agg.result().items():
        assert torch.equal(new, u[name]), name  # averaging the products themselves would pull U to its truncation


def test_bad_uploads_are_rejected_with_a_reason() -> None:
    with pytest.raises(ValueError, match="rank"):
        redistribute({}, {}, rank=-1, scaling=1.0)
    model = llama()
    u = init_global_update(model.state_dict(), LLAMA_T)
    plan = plan_for(model, SMALL)
    start, trained = _client(u, plan, 2, 1.0, seed=0)
    agg = LoRAFedAvg(u)
    name = "model.layers.0.mlp.up_proj.lora_B"
    for bad, reason in (
        ({**trained, name: torch.zeros(128, 2)}, "shape"),  # the global width, not the slice's
        ({n: t for n, t in trained.items() if n != name}, "missing_tensor"),
        ({**trained, "model.layers.0.mlp.up_proj.weight": torch.zeros(40, 64)}, "unknown_tensor"),
        ({**trained, name: torch.full((40, 2), float("nan"))}, "non_finite"),
    ):
        with pytest.raises(UpdateRejected) as info:
            agg.fold(start, bad, plan, 1, scaling=1.0)
        assert info.value.reason == reason
    assert agg.participants == 0
    with pytest.raises(ValueError, match="scaling"):
        agg.fold(start, trained, plan, 1, scaling=0.0)


def test_one_round_end_to_end_the_server_merges_what_the_device_learned() -> None:
    """A device trains its slice's adapters for real; the server folds them into U; the merged global model cut to
    the device's spec computes what the device's merged model computes."""
    global_model = llama()
    plan = plan_for(global_model, SMALL)
    u = init_global_update(global_model.state_dict(), LLAMA_T)
    config = LoRAConfig(rank=4, alpha=8.0, targets=LLAMA_T)
    start = redistribute(u, plan, config.rank, config.scaling, generator=torch.Generator().manual_seed(0))

    device = apply_lora(extract(global_model, SMALL), config)
    load_adapters(device, start)
    device.train()
    opt = torch.optim.AdamW([p for p in device.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss = device(input_ids=ids(step), labels=ids(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained = adapter_state(device.eval())

    agg = LoRAFedAvg(u)
    agg.fold(start, trained, plan, 8, scaling=config.scaling)
    merged_global = merge_update(global_model.state_dict(), agg.result())
    served = llama()
    served.load_state_dict(merged_global)
    cut = extract(served.eval(), SMALL)
    diff = (logits(cut) - logits(merge_lora(device))).abs().max().item()
    assert diff <= 1e-5, diff
    assert (logits(cut) - logits(extract(global_model, SMALL))).abs().max() > 1e-4  # it did learn something


# -- bytes ----------------------------------------------------------------------------------------------------------


def test_a_round_moves_adapters_far_smaller_than_the_model() -> None:
    model = llama()
    plan = plan_for(model, ElasticSpec.full(dims_of(model)))
    full_bytes = 4 * sum(s.numel for s in plan.values())
    down, up = round_bytes(plan, LLAMA_T, rank=4)
    wrapped = apply_lora(llama(), LoRAConfig(rank=4, targets=LLAMA_T))
    assert down == up == 4 * trainable_parameters(wrapped)  # the counter agrees with the real adapters
    assert down + up <= 0.10 * 2 * full_bytes, (down, full_bytes)
    # a real-sized decoder (TinyLlama-1.1B shapes, built on the meta device): rank 8 on every linear layer
    with torch.device("meta"):
        big = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=22,
                                           num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632))
    big_plan = plan_for(big, ElasticSpec.full(dims_of(big)))
    ratio = round_bytes(big_plan, LLAMA_T, rank=8)[1] / (4 * sum(s.numel for s in big_plan.values()))
    assert ratio < 0.01, ratio
    with pytest.raises(ValueError, match="match no weight"):
        round_bytes(plan, ("query",), rank=4)
    assert canonical_shapes(big)  # built without memory


def test_start_adapters_are_the_same_for_every_server_and_carry_current_minus_base() -> None:
    from raffm.lora_fed import adapter_seed, start_adapters

    torch.manual_seed(3)
    base = {"l.q.weight": torch.randn(8, 6), "l.v.weight": torch.randn(4, 6)}
    current = {n: w + 0.1 * torch.randn(w.shape) for n, w in base.items()}
    seed = adapter_seed("job-v2", "job-v0", "spec", "8")
    one = start_adapters(current, base, 8, 2.0, seed)
    two = start_adapters(dict(reversed(list(current.items()))), base, 8, 2.0, seed)
    assert one.keys() == two.keys() and all(torch.equal(one[n], two[n]) for n in one)
    for name in base:
        m = name[: -len(".weight")]
        product = one[m + ".lora_B"].double() @ one[m + ".lora_A"].double() * 2.0
        assert torch.allclose(product, (current[name] - base[name]).double(), atol=1e-5)
    fresh = start_adapters(base, base, 4, 1.0, seed)  # round one: zero B, seeded random A
    assert all(fresh[n].abs().sum() == 0 for n in fresh if n.endswith(".lora_B"))
    assert adapter_seed("a", "b") != adapter_seed("ab") and adapter_seed("a") == adapter_seed("a")
