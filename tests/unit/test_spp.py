"""SPP reorders channels without changing what the network computes."""

from __future__ import annotations

import copy

import pytest
import torch

from raffm.arch import adapter_for
from raffm.spp import l1_score, prioritize, prioritize_state
from tests.unit.models_fixtures import inputs, make, output

KINDS = ["bert", "bert-base", "roberta", "xlm-roberta", "camembert", "electra-base", "electra-small", "distilbert",
         "deberta", "deberta-v2", "opt", "opt-base", "opt-classifier", "phi", "phi-base", "phi-classifier", "gpt2",
         "gpt2-base", "gpt2-classifier", "neox", "neox-base", "neox-classifier", "modernbert", "modernbert-base",
         "modernbert-cls", "vit", "vit-base"]


@pytest.mark.parametrize("kind", KINDS)
def test_spp_preserves_outputs(kind: str) -> None:
    model = make(kind)
    batch = inputs(kind)
    ordered = prioritize(model)
    diff = (output(ordered, batch) - output(model, batch)).abs().max().item()
    assert diff <= 1e-5, f"SPP changed {kind} outputs by {diff}"


def test_spp_preserves_real_minilm(minilm: torch.nn.Module) -> None:
    batch = {"input_ids": torch.tensor([[101, 2023, 3185, 2001, 2307, 999, 102]]), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    ordered = prioritize(minilm)
    diff = (output(ordered, batch) - output(minilm, batch)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("kind", ["bert", "vit"])
def test_spp_does_not_mutate_input(kind: str) -> None:
    model = make(kind)
    before = copy.deepcopy(model.state_dict())
    prioritize(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_spp_actually_reorders_and_sorts_salience() -> None:
    model = make("bert")
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    state = prioritize_state(model.state_dict(), adapter, dims)
    prefix = "bert.encoder.layer.0."
    # FFN neurons: W_in row + W_out column L1 is non-increasing after SPP.
    w_in, w_out = state[prefix + "intermediate.dense.weight"], state[prefix + "output.dense.weight"]
    ffn = l1_score(w_in, 0) + l1_score(w_out, 1)
    assert torch.all(ffn[:-1] >= ffn[1:])
    # Whole heads ranked, then Q/K dims within every head share one order.
    q, k = state[prefix + "attention.self.query.weight"], state[prefix + "attention.self.key.weight"]
    qk = (l1_score(q, 0) + l1_score(k, 0)).view(dims.heads, dims.head_dim)
    assert torch.all(qk[:, :-1] >= qk[:, 1:])
    v, o = state[prefix + "attention.self.value.weight"], state[prefix + "attention.output.dense.weight"]
    vd = (l1_score(v, 0) + l1_score(o, 1)).view(dims.heads, dims.head_dim)
    assert torch.all(vd[:, :-1] >= vd[:, 1:])
    heads = ((l1_score(q, 0) + l1_score(k, 0) + l1_score(v, 0) + l1_score(o, 1)).view(dims.heads, -1)).sum(1)
    assert torch.all(heads[:-1] >= heads[1:])
    # And it is a real change for this random model (else the checks above would be vacuous).
    assert not torch.equal(w_in, model.state_dict()[prefix + "intermediate.dense.weight"])


def test_spp_ranks_whole_heads_of_a_fused_projection() -> None:
    """GPT-2's c_attn ([in, q | k | v]): a head's score sums its columns in the three parts and its c_proj rows; one
    head order moves inside every part, and dimensions inside a head keep their order (specs never cut them)."""
    model = make("gpt2")
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    before = model.state_dict()
    state = prioritize_state(before, adapter, dims)
    prefix = "transformer.h.0."
    qkv, proj = state[prefix + "attn.c_attn.weight"], state[prefix + "attn.c_proj.weight"]
    heads = l1_score(qkv, 1).view(3, dims.heads, -1).sum(dim=(0, 2)) + l1_score(proj, 0).view(dims.heads, -1).sum(1)
    assert torch.all(heads[:-1] >= heads[1:])
    old = before[prefix + "attn.c_attn.weight"].view(-1, 3, dims.heads, dims.head_dim)
    new = qkv.view(-1, 3, dims.heads, dims.head_dim)
    order = [next(j for j in range(dims.heads) if torch.equal(new[:, 0, i], old[:, 0, j])) for i in range(dims.heads)]
    assert order != sorted(order)  # a real reordering
    assert torch.equal(new, old[:, :, order])  # the same head order in q, k and v, each head intact


def test_spp_ranks_whole_heads_of_a_projection_fused_per_head() -> None:
    """GPT-NeoX's query_key_value ([heads, q | k | v, in]): a head's score sums its contiguous block of rows and its
    dense columns; the blocks move whole, in one order with the dense columns."""
    model = make("neox")
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    before = model.state_dict()
    state = prioritize_state(before, adapter, dims)
    prefix = "gpt_neox.layers.0.attention."
    qkv, dense = state[prefix + "query_key_value.weight"], state[prefix + "dense.weight"]
    heads = l1_score(qkv, 0).view(dims.heads, -1).sum(1) + l1_score(dense, 1).view(dims.heads, -1).sum(1)
    assert torch.all(heads[:-1] >= heads[1:])
    old = before[prefix + "query_key_value.weight"].view(dims.heads, 3 * dims.head_dim, -1)
    new = qkv.view(dims.heads, 3 * dims.head_dim, -1)
    order = [next(j for j in range(dims.heads) if torch.equal(new[i], old[j])) for i in range(dims.heads)]
    assert order != sorted(order)  # a real reordering
    old_dense = before[prefix + "dense.weight"].view(-1, dims.heads, dims.head_dim)
    assert torch.equal(dense.view(-1, dims.heads, dims.head_dim), old_dense[:, order])


def test_spp_ranks_glu_neurons_by_both_halves_and_moves_them_together() -> None:
    """ModernBERT's Wi ([input | gate, in]): a neuron's score sums its input row, its gate row and its Wo column; one
    order moves inside both halves and the Wo columns, so input j is still gated by gate j."""
    model = make("modernbert")
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    before = model.state_dict()
    state = prioritize_state(before, adapter, dims)
    prefix = "model.layers.1.mlp."
    wi, wo = state[prefix + "Wi.weight"], state[prefix + "Wo.weight"]
    neurons = l1_score(wi, 0).view(2, dims.ffn).sum(0) + l1_score(wo, 1)
    assert torch.all(neurons[:-1] >= neurons[1:])
    old = before[prefix + "Wi.weight"].view(2, dims.ffn, -1)
    new = wi.view(2, dims.ffn, -1)
    order = [next(j for j in range(dims.ffn) if torch.equal(new[0, i], old[0, j])) for i in range(dims.ffn)]
    assert order != sorted(order)  # a real reordering
    assert torch.equal(new, old[:, order]) and torch.equal(state[prefix + "Wi.bias"].view(2, -1),
                                                           before[prefix + "Wi.bias"].view(2, -1)[:, order])
    assert torch.equal(wo, before[prefix + "Wo.weight"][:, order])


def test_spp_is_idempotent() -> None:
    model = make("roberta")
    once = prioritize(model)
    twice = prioritize(once)
    for name, tensor in once.state_dict().items():
        assert torch.equal(tensor, twice.state_dict()[name]), name
