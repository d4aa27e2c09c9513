"""The Llama-family adapter: SPP and slicing preserve a decoder LLM's function (GQA, RoPE, RMSNorm, SwiGLU, tied or
untied LM head), on random-init tiny configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from raffm.arch import LLAMA, adapter_for, tied_aliases
from raffm.costs import MIB, CostModel
from raffm.elastic import extract, plan_for, stock_config
from raffm.fitting import ladder
from raffm.slicing import slice_state
from raffm.spec import ElasticSpec, LayerSpec
from raffm.spp import l1_score, prioritize
from tests.unit.test_costs import _saved_activation_bytes

VOCAB = 128
TOL = 1e-4  # the bar for fp32 logits
# name -> (config class, model class, config overrides)
VARIANTS: dict[str, tuple[type, type, dict[str, object]]] = {
    "gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
    "tied": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "gqa4": (LlamaConfig, LlamaForCausalLM, dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16)),  # q 128 > hidden
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),  # q/k/v biases
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, head_dim=8)),  # heads * head_dim < hidden
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2)),  # q/k RMSNorm per head; head_dim 128
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(num_key_value_heads=2, head_dim=32)),  # GELU gate, q 128 > hidden
    # every second layer without rotary embeddings (NoPE)
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM,
                dict(num_key_value_heads=2, no_rope_layer_interval=2, pad_token_id=0)),
    "granite": (GraniteConfig, GraniteForCausalLM, dict(num_key_value_heads=2, embedding_multiplier=2.0,
                                                        residual_multiplier=0.5, logits_scaling=4.0)),
}


def make(variant: str, seed: int = 0) -> PreTrainedModel:
    config_cls, model_cls, overrides = VARIANTS[variant]
    values: dict[str, object] = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    values.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**values))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial RMSNorm weights and biases, so a wrong permutation of them would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding must be handled identically too
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: PreTrainedModel, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or batch())).logits  # type: ignore[no-any-return]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_llama_family_uses_the_llama_adapter_and_counts_kv_groups() -> None:
    for variant in VARIANTS:
        model = make(variant)
        assert adapter_for(model) is LLAMA
    dims = LLAMA.dims(make("gqa4").config)
    assert (dims.heads, dims.group, dims.head_dim, dims.ffn, dims.fixed_head_dim) == (2, 4, 16, 128, True)
    assert LLAMA.dims(make("mistral").config).head_dim == 8  # the config's explicit head_dim, not hidden // heads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_spp_preserves_logits(variant: str) -> None:
    model = make(variant)
    ordered = prioritize(model)
    diff = max_diff(logits(ordered), logits(model))
    assert diff <= TOL, f"SPP changed {variant} logits by {diff}"
    # and it really reordered something (else the check is vacuous)
    moved = [n for n, t in ordered.state_dict().items() if not torch.equal(t, model.state_dict()[n])]
    assert any("q_proj" in n for n in moved) and any("gate_proj" in n for n in moved)


def _group_blocks(state: dict[str, torch.Tensor], layer: int, dims) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Every KV group's tensors flattened into one vector: k, v rows, its query rows and their o_proj columns."""
    p = f"model.layers.{layer}.self_attn."
    G, D, g = dims.heads, dims.head_dim, dims.group
    q = state[p + "q_proj.weight"].view(G, g * D, -1)
    o = state[p + "o_proj.weight"].view(-1, G, g * D).transpose(0, 1)
    k = state[p + "k_proj.weight"].view(G, D, -1)
    v = state[p + "v_proj.weight"].view(G, D, -1)
    return [torch.cat([q[i].flatten(), k[i].flatten(), v[i].flatten(), o[i].flatten()]) for i in range(G)]


@pytest.mark.parametrize("variant", ["gqa", "gqa4", "mha"])
def test_spp_moves_whole_kv_groups_and_ranks_them(variant: str) -> None:
    model = make(variant)
    dims = LLAMA.dims(model.config)
    before, after = model.state_dict(), prioritize(model).state_dict()
    for layer in range(dims.layers):
        old, new = _group_blocks(before, layer, dims), _group_blocks(after, layer, dims)
        # every group of the ordered model is, element for element, one group of the original: a KV head moved with
        # all its query heads and nothing was permuted inside a head (RoPE)
        perm = [next(j for j, b in enumerate(old) if torch.equal(a, b)) for a in new]
        assert sorted(perm) == list(range(dims.heads))
        # ranked by the L1 mass of their q, k, v rows and o columns, most salient first
        p = f"model.layers.{layer}.self_attn."
        score = sum(l1_score(after[p + n], 0).view(dims.heads, -1).sum(1) for n in ("q_proj.weight", "k_proj.weight",
                                                                                  "v_proj.weight"))
        score = score + l1_score(after[p + "o_proj.weight"], 1).view(dims.heads, -1).sum(1)
        assert torch.all(score[:-1] >= score[1:])
        # SwiGLU neurons: gate row + up row + down column, non-increasing
        m = f"model.layers.{layer}.mlp."
        ffn = l1_score(after[m + "gate_proj.weight"], 0) + l1_score(after[m + "up_proj.weight"], 0)
        ffn = ffn + l1_score(after[m + "down_proj.weight"], 1)
        assert torch.all(ffn[:-1] >= ffn[1:])


def _permute_rows(w: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return w.index_select(0, index)


def _peaky(variant: str) -> PreTrainedModel:
    """A model whose attention is far from uniform (q and k scaled up): random init's tiny scores would hide what
    a change of the attention pattern does to the logits."""
    model = make(variant)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def test_rope_forbids_permuting_inside_a_head_but_whole_groups_are_free() -> None:
    """BERT's Theorem-1 move (one permutation of the q and k dimensions inside every head) changes a RoPE model's
    logits: rotary embeddings pair dimension i with i + head_dim/2 at a fixed frequency. Moving whole KV groups with
    their query heads (what SPP does) leaves them unchanged."""
    model = _peaky("gqa")
    dims = LLAMA.dims(model.config)
    G, D, g = dims.heads, dims.head_dim, dims.group
    reference = logits(model)
    gen = torch.Generator().manual_seed(3)

    inside = _peaky("gqa")
    within = torch.randperm(D, generator=gen)
    with torch.no_grad():
        for layer in inside.model.layers:
            attn = layer.self_attn
            for proj, heads in ((attn.q_proj, G * g), (attn.k_proj, G)):
                index = (torch.arange(heads)[:, None] * D + within).reshape(-1)
                proj.weight.copy_(_permute_rows(proj.weight, index))
    changed = max_diff(logits(inside), reference)
    assert changed > 1000 * TOL, f"a within-head q/k permutation should change RoPE logits; it moved them by {changed}"

    groups = _peaky("gqa")
    order = torch.tensor([1, 0])
    with torch.no_grad():
        for layer in groups.model.layers:
            attn = layer.self_attn
            q_index = (order[:, None] * (g * D) + torch.arange(g * D)).reshape(-1)
            kv_index = (order[:, None] * D + torch.arange(D)).reshape(-1)
            attn.q_proj.weight.copy_(_permute_rows(attn.q_proj.weight, q_index))
            attn.o_proj.weight.copy_(attn.o_proj.weight.index_select(1, q_index))
            attn.k_proj.weight.copy_(_permute_rows(attn.k_proj.weight, kv_index))
            attn.v_proj.weight.copy_(_permute_rows(attn.v_proj.weight, kv_index))
    assert max_diff(logits(groups), reference) <= TOL
    assert max_diff(logits(prioritize(model)), reference) <= TOL  # SPP on the same peaky model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_full_spec_extraction_is_the_identity(variant: str) -> None:
    ordered = prioritize(make(variant))
    dims = LLAMA.dims(ordered.config)
    sub = extract(ordered, ElasticSpec.full(dims))
    assert max_diff(logits(sub), logits(ordered)) <= TOL
    assert sum(p.numel() for p in sub.parameters()) == sum(p.numel() for p in ordered.parameters())
    for name, tensor in ordered.state_dict().items():
        assert torch.equal(sub.state_dict()[name], tensor), name
    assert tied_aliases(sub) == tied_aliases(ordered)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cut_loads_into_a_stock_model_of_the_cut_config_and_runs(variant: str, tmp_path: Path) -> None:
    ordered = prioritize(make(variant))
    dims = LLAMA.dims(ordered.config)
    spec = ElasticSpec.uniform(dims, heads=1, ffn=40, depth=1 if variant in ("gqa4", "smollm3") else None)
    sub = extract(ordered, spec)
    config = stock_config(ordered.config, spec)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (dims.group, 1, dims.head_dim)
    assert (config.intermediate_size, config.num_hidden_layers, config.hidden_size) == (40, spec.depth, 64)
    plain = type(ordered)(config).eval()  # the stock LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM
    result = plain.load_state_dict(slice_state(ordered.state_dict(), plan_for(ordered, spec)), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == set(tied_aliases(ordered))  # a tied head comes with the embedding
    out = logits(plain)
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()
    assert max_diff(out, logits(sub)) <= TOL  # the elastic class and the stock class compute the same sub-model
    # and the elastic sub-model round-trips through save_pretrained / AutoModelForCausalLM
    sub.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(logits(again), logits(sub)) == 0.0
    # it also generates
    with torch.no_grad():
        generated = plain.generate(batch()["input_ids"][1:], min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 15)


def test_cut_keeps_whole_kv_groups_with_all_their_query_heads() -> None:
    ordered = prioritize(make("gqa4"))  # 8 query heads in 2 KV groups of 4, head_dim 16
    dims = LLAMA.dims(ordered.config)
    spec = ElasticSpec(hidden=64, layers=(LayerSpec(heads=1, head_dim=16, ffn=24), LayerSpec(heads=2, head_dim=16, ffn=128)))
    plan = plan_for(ordered, spec)
    state = ordered.state_dict()
    a = "model.layers.0.self_attn."
    assert plan[a + "q_proj.weight"].sub_shape == (4 * 16, 64)  # one KV group = 4 query heads
    assert plan[a + "k_proj.weight"].sub_shape == plan[a + "v_proj.weight"].sub_shape == (16, 64)
    assert plan[a + "o_proj.weight"].sub_shape == (64, 4 * 16)
    sub = slice_state(state, plan)
    assert torch.equal(sub[a + "q_proj.weight"], state[a + "q_proj.weight"][:64])  # the leading group's 4 heads
    assert torch.equal(sub[a + "k_proj.weight"], state[a + "k_proj.weight"][:16])
    assert torch.equal(sub[a + "o_proj.weight"], state[a + "o_proj.weight"][:, :64])
    assert torch.equal(sub["model.layers.0.mlp.down_proj.weight"], state["model.layers.0.mlp.down_proj.weight"][:, :24])
    model = extract(ordered, spec)  # layers of different widths: the elastic class holds them
    assert model.model.layers[0].self_attn.num_key_value_groups == dims.group
    assert torch.isfinite(logits(model)).all()


def test_head_dim_cuts_are_rejected_for_rope_models() -> None:
    model = make("gqa")
    dims = LLAMA.dims(model.config)
    with pytest.raises(ValueError, match="needs every head's full 16 dimensions"):
        extract(model, ElasticSpec.uniform(dims, heads=2, head_dim=8, ffn=128))
    with pytest.raises(ValueError, match="layer 0 heads"):
        ElasticSpec.uniform(dims, heads=3, ffn=128).validate(dims)  # only 2 KV groups


def test_the_fitter_ladder_cuts_kv_groups_and_every_rung_extracts() -> None:
    ordered = prioritize(make("gqa4"))
    dims = LLAMA.dims(ordered.config)
    rungs = ladder(dims)
    assert [r.layers[0].heads for r in rungs] == [1, 2]
    for rung in rungs:
        assert all(l.head_dim == dims.head_dim for l in rung.layers)
        assert torch.isfinite(logits(extract(ordered, rung))).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cost_model_params_equal_the_real_models(variant: str) -> None:
    model = make(variant)
    cm = CostModel.from_model(model)
    full = ElasticSpec.full(cm.dims)
    assert cm.params(full) == sum(p.numel() for p in model.parameters())  # a tied head counts once
    for spec in (ElasticSpec.uniform(cm.dims, heads=1, ffn=40),
                 ElasticSpec(hidden=64, layers=(LayerSpec(cm.dims.heads, cm.dims.head_dim, 8),))):
        sub = extract(model, spec)
        assert cm.params(spec) == sum(p.numel() for p in sub.parameters())
        assert cm.estimate(spec, batch_size=1, seq_len=8).wire_bytes == 4 * cm.params(spec)


def test_flops_count_swiglu_gqa_and_the_lm_head() -> None:
    model = make("gqa4")  # 2 KV groups of 4 query heads, head_dim 16, hidden 64
    cm = CostModel.from_model(model)
    spec = ElasticSpec(hidden=64, layers=(LayerSpec(1, 16, 24), LayerSpec(2, 16, 128)))
    L, h = 10, 64
    macs = 0
    for groups, f in ((1, 24), (2, 128)):
        a, c = groups * 4 * 16, groups * 16
        macs += 2 * L * h * a + 2 * L * h * c + 3 * L * h * f + 2 * L * L * a  # q+o, k+v, SwiGLU, attention
    macs += L * h * VOCAB  # logits at every position
    assert cm.estimate(spec, batch_size=1, seq_len=L).forward_flops_per_sample == 2.0 * macs


@pytest.mark.parametrize("variant", ["gqa", "tied", "mha", "qwen3", "gemma", "smollm3", "granite"])
def test_activation_formula_matches_what_autograd_saves_llama(variant: str) -> None:
    model = make(variant)
    cm = CostModel.from_model(model)
    d = cm.dims.head_dim
    cut = ElasticSpec(hidden=64, layers=(LayerSpec(1, d, 40), LayerSpec(cm.dims.heads, d, 96)))
    for spec in (ElasticSpec.full(cm.dims), cut):
        sub = extract(model, spec).train()
        ids = torch.randint(0, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
        saved = _saved_activation_bytes(sub, input_ids=ids, labels=ids)  # an unpadded batch (see raffm.costs)
        predicted = cm.estimate(spec, batch_size=4, seq_len=24).activations_mb * MIB
        assert predicted == pytest.approx(saved, rel=0.02), (predicted, saved)
