"""Extraction gives real HF sub-models; scatter is the exact inverse of slicing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModel, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification, GPT2Config,
    OPTConfig, PhiConfig,
)

from raffm.arch import adapter_for
from raffm.elastic import extract, plan_for
from raffm.slicing import coverage_mask, scatter, slice_state
from raffm.spec import ElasticSpec, LayerSpec, ModelDims
from raffm.spp import prioritize
from tests.unit.models_fixtures import GPT2, MODERNBERT, OPT, PHI, inputs, make, output

KINDS = ["bert", "bert-base", "roberta", "xlm-roberta", "camembert", "electra-base", "electra-small", "distilbert",
         "deberta", "deberta-v2", "opt", "opt-base", "opt-classifier", "phi", "phi-base", "phi-classifier", "gpt2",
         "gpt2-base", "gpt2-classifier", "neox", "neox-base", "neox-classifier", "modernbert", "modernbert-base",
         "modernbert-cls", "vit", "vit-base"]
AUTO = {"bert": AutoModelForSequenceClassification, "roberta": AutoModelForSequenceClassification,
        "electra-small": AutoModelForSequenceClassification,
        "xlm-roberta": AutoModelForSequenceClassification, "camembert": AutoModelForSequenceClassification,
        "distilbert": AutoModelForSequenceClassification, "deberta": AutoModelForSequenceClassification,
        "deberta-v2": AutoModelForSequenceClassification, "opt": AutoModelForCausalLM, "opt-base": AutoModel,
        "opt-classifier": AutoModelForSequenceClassification, "phi": AutoModelForCausalLM, "phi-base": AutoModel,
        "phi-classifier": AutoModelForSequenceClassification, "gpt2": AutoModelForCausalLM, "gpt2-base": AutoModel,
        "gpt2-classifier": AutoModelForSequenceClassification, "neox": AutoModelForCausalLM, "neox-base": AutoModel,
        "neox-classifier": AutoModelForSequenceClassification, "modernbert": AutoModelForSequenceClassification,
        "modernbert-base": AutoModel, "modernbert-cls": AutoModelForSequenceClassification,
        "vit": AutoModelForImageClassification, "bert-base": AutoModel, "vit-base": AutoModel, "electra-base": AutoModel}


def small_spec(dims: ModelDims) -> ElasticSpec:
    return ElasticSpec(
        hidden=dims.hidden - 8,
        layers=(LayerSpec(min(3, dims.heads), dims.head_dim if dims.fixed_head_dim else dims.head_dim - 4, 50),
                LayerSpec(1, dims.head_dim, dims.ffn)),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_full_spec_reproduces_global_outputs(kind: str) -> None:
    model = prioritize(make(kind))
    sub = extract(model, ElasticSpec.full(adapter_for(model).dims(model.config)))
    batch = inputs(kind)
    assert (output(sub, batch) - output(model, batch)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_saved_submodel_reloads_to_identical_outputs(kind: str, tmp_path: Path) -> None:
    model = prioritize(make(kind))
    spec = small_spec(adapter_for(model).dims(model.config))
    sub = extract(model, spec)
    sub.save_pretrained(tmp_path)
    reloaded = AUTO[kind].from_pretrained(tmp_path).eval()
    assert reloaded.elastic_spec == spec
    batch = inputs(kind)
    assert torch.equal(output(reloaded, batch), output(sub, batch))
    # The sub-model is really smaller, and exactly as large as its slice plan says.
    n_sub = sum(p.numel() for p in sub.parameters())
    assert n_sub == sum(s.numel for s in plan_for(model, spec).values())
    assert n_sub < sum(p.numel() for p in model.parameters())


def test_submodel_trains_and_global_is_untouched() -> None:
    model = prioritize(make("bert"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sub = extract(model, small_spec(adapter_for(model).dims(model.config))).train()
    loss = sub(**inputs("bert"), labels=torch.tensor([0, 2])).loss
    loss.backward()
    torch.optim.AdamW(sub.parameters(), lr=1e-2).step()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_per_head_slicing_keeps_leading_dims_of_each_head() -> None:
    model = make("bert")
    dims = adapter_for(model).dims(model.config)
    spec = ElasticSpec.uniform(dims, heads=2, head_dim=5, ffn=dims.ffn)
    sub = slice_state(model.state_dict(), plan_for(model, spec))
    q = model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"]
    expected = torch.cat([q[h * dims.head_dim : h * dims.head_dim + 5] for h in range(2)])
    assert torch.equal(sub["bert.encoder.layer.0.attention.self.query.weight"], expected)
    o = model.state_dict()["bert.encoder.layer.0.attention.output.dense.weight"]
    expected_o = torch.cat([o[:, h * dims.head_dim : h * dims.head_dim + 5] for h in range(2)], dim=1)
    assert torch.equal(sub["bert.encoder.layer.0.attention.output.dense.weight"], expected_o)


def test_dropped_layers_are_absent() -> None:
    model = make("bert")
    dims = adapter_for(model).dims(model.config)
    plan = plan_for(model, ElasticSpec.uniform(dims, heads=4, ffn=dims.ffn, depth=1))
    assert not any(".layer.1." in n or ".layer.2." in n for n in plan)
    assert any(".layer.0." in n for n in plan)


@pytest.mark.parametrize(
    "spec, message",
    [
        (ElasticSpec(hidden=49, layers=(LayerSpec(4, 12, 96),) * 3), "hidden is 49; it must be an integer between 1 and 48"),
        (ElasticSpec(hidden=48, layers=(LayerSpec(4, 12, 96), LayerSpec(5, 12, 96))), "layer 1 heads is 5"),
        (ElasticSpec(hidden=48, layers=(LayerSpec(4, 0, 96),)), "layer 0 head_dim is 0"),
        (ElasticSpec(hidden=48, layers=(LayerSpec(4, 12, 97),)), "layer 0 ffn is 97; it must be an integer between 1 and 96"),
        (ElasticSpec(hidden=48, layers=(LayerSpec(4, 12, 96),) * 4), "spec has 4 layers"),
    ],
)
def test_invalid_specs_name_layer_and_bound(spec: ElasticSpec, message: str) -> None:
    model = make("bert")
    with pytest.raises(ValueError, match=message):
        extract(model, spec)


def test_spec_json_round_trip_and_errors() -> None:
    dims = ModelDims(hidden=48, layers=3, heads=4, head_dim=12, ffn=96)
    spec = small_spec(dims)
    assert ElasticSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="needs 'hidden' and 'layers'"):
        ElasticSpec.from_dict({"layers": []})


@st.composite
def specs(draw: st.DrawFn, dims: ModelDims) -> ElasticSpec:
    depth = draw(st.integers(1, dims.layers))
    layers = tuple(
        LayerSpec(draw(st.integers(1, dims.heads)), draw(st.integers(1, dims.head_dim)), draw(st.integers(1, dims.ffn)))
        for _ in range(depth)
    )
    return ElasticSpec(hidden=draw(st.integers(1, dims.hidden)), layers=layers)


_MODEL = make("roberta")
_DIMS = adapter_for(_MODEL).dims(_MODEL.config)


@settings(max_examples=40, deadline=None)
@given(spec=specs(_DIMS))
def test_scatter_of_slice_is_identity_on_kept_elements(spec: ElasticSpec) -> None:
    state = _MODEL.state_dict()
    plan = plan_for(_MODEL, spec)
    sub = slice_state(state, plan)
    # Writing the slice back into a zero model restores exactly the kept elements and nothing else.
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    back = scatter(zeros, sub, plan)
    for name, tensor in state.items():
        if name not in plan:
            assert not back[name].any()
            continue
        mask = coverage_mask(plan[name])
        assert torch.equal(back[name][mask], tensor[mask])
        assert not back[name][~mask].any()
        assert mask.sum().item() == plan[name].numel
    # And slicing the scattered state gives the sub-model tensors back.
    again = slice_state(back, plan)
    assert all(torch.equal(again[k], sub[k]) for k in sub)


def test_narrower_embeddings_keep_their_width_and_their_projection_is_cut_with_hidden() -> None:
    """ELECTRA-small projects 128-wide embeddings into 256-wide layers: the embeddings are never cut, the projection's
    rows follow the hidden width."""
    model = prioritize(make("electra-small"))
    spec = small_spec(adapter_for(model).dims(model.config))
    plan = plan_for(model, spec)
    assert plan["electra.embeddings.word_embeddings.weight"].sub_shape == (120, 16)
    assert plan["electra.embeddings.LayerNorm.weight"].sub_shape == (16,)
    assert plan["electra.embeddings_project.weight"].sub_shape == (spec.hidden, 16)
    assert plan["electra.embeddings_project.bias"].sub_shape == (spec.hidden,)
    sub = extract(model, spec)
    assert sub.electra.embeddings_project.weight.shape == (spec.hidden, 16)
    assert output(sub, inputs("electra-small")).shape == (2, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_the_services_read_the_same_dims_from_a_config_dict(kind: str) -> None:
    """The aggregator and extractor know a version by its config dict (a checkpoint's): the dims must be the
    model's, also for a family whose config only aliases the standard names (DistilBERT's dim, n_heads)."""
    from raffm.planning import adapter_and_dims

    model = make(kind)
    adapter, dims = adapter_and_dims(model.config.to_dict())
    assert adapter is adapter_for(model) and dims == adapter.dims(model.config)
    assert dims.hidden == model.config.hidden_size and dims.layers == model.config.num_hidden_layers


def test_opt_cuts_head_dimensions_with_the_global_query_scaling() -> None:
    """OPT scales its queries by the global head_dim ** -0.5, fixed when the attention is built: a sub-model that keeps
    the leading 8 of 12 dimensions of every head computes exactly the global model with the other 4 zeroed (their q/k
    rows add nothing to the scores, their v rows nothing to the output)."""
    model = prioritize(make("opt"))
    dims = adapter_for(model).dims(model.config)
    spec = ElasticSpec.uniform(dims, heads=dims.heads, head_dim=8, ffn=dims.ffn)
    masked = prioritize(make("opt"))
    with torch.no_grad():
        for layer in masked.model.decoder.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight.view(dims.heads, dims.head_dim, -1)[:, 8:] = 0
                proj.bias.view(dims.heads, dims.head_dim)[:, 8:] = 0
    sub = extract(model, spec)
    assert sub.model.decoder.layers[0].self_attn.scaling == dims.head_dim**-0.5
    batch = inputs("opt")
    cut, reference = output(sub, batch), output(masked, batch)
    assert (cut - reference).abs().max().item() <= 1e-5
    assert (cut - output(model, batch)).abs().max().item() > 1e-3  # the cut really changed the model


@pytest.mark.parametrize("overrides, message", [
    (dict(word_embed_proj_dim=32), "word_embed_proj_dim 32 != hidden_size 48"),
    (dict(do_layer_norm_before=False), "do_layer_norm_before=False"),
])
def test_opt_layouts_the_adapter_does_not_describe_are_refused(overrides: dict[str, object], message: str) -> None:
    """OPT-350m projects narrower embeddings into and out of post-LN layers: refused by name, not mis-sliced."""
    with pytest.raises(ValueError, match=message):
        adapter_for(OPTConfig(vocab_size=120, **{**OPT, **overrides}))


def test_phi_with_query_and_key_layernorms_is_refused() -> None:
    """qk_layernorm normalises every query and key head over hidden_size // num_attention_heads: refused by name."""
    with pytest.raises(ValueError, match="qk_layernorm=True"):
        adapter_for(PhiConfig(vocab_size=120, qk_layernorm=True, **PHI))
    assert adapter_for(PhiConfig(vocab_size=120, **PHI)).name == "phi"


@pytest.mark.parametrize("kind", ["gpt2", "gpt2-classifier"])
def test_gpt2_keeps_whole_heads_of_its_fused_projection(kind: str) -> None:
    """GPT-2's c_attn computes [q | k | v] in one Conv1D (weight [in, out]): keeping 2 of 4 heads keeps the leading 2
    heads of each part, so a sub-model with 2 heads and 40 FFN neurons computes exactly the global model with the
    other heads' value columns and the other neurons' output rows zeroed (they then add nothing), global scaling
    kept."""
    model = prioritize(make(kind))
    dims = adapter_for(model).dims(model.config)
    assert dims.fixed_head_dim and dims.ffn == 96
    spec = ElasticSpec.uniform(dims, heads=2, ffn=40)
    masked = prioritize(make(kind))
    with torch.no_grad():
        for block in masked.transformer.h:
            block.attn.c_attn.weight.view(-1, 3, dims.heads, dims.head_dim)[:, 2, 2:] = 0
            block.attn.c_attn.bias.view(3, dims.heads, dims.head_dim)[2, 2:] = 0
            block.mlp.c_proj.weight[40:] = 0
    sub = extract(model, spec)
    attn = sub.transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.scaling) == (2, 2 * dims.head_dim, dims.head_dim**-0.5)
    assert sub.transformer.h[0].attn.c_attn.weight.shape == (dims.hidden, 3 * 2 * dims.head_dim)
    batch = inputs(kind)
    cut = output(sub, batch)
    assert (cut - output(masked, batch)).abs().max().item() <= 1e-5
    assert (cut - output(model, batch)).abs().max().item() > 1e-3  # the cut really changed the model


@pytest.mark.parametrize("kind", ["neox", "neox-base", "neox-classifier"])
def test_neox_keeps_whole_heads_of_its_per_head_fused_projection(kind: str) -> None:
    """GPT-NeoX's query_key_value groups its output rows per head ([heads, 3, head_dim]): keeping 2 of 4 heads keeps
    the leading 2 blocks of 3 * head_dim rows, so a sub-model with 2 heads and 40 FFN neurons computes exactly the
    global model with the other heads' value rows and the other neurons' output columns zeroed (they then add
    nothing), with parallel or sequential residuals; the head size and the scaling stay the global head's."""
    model = prioritize(make(kind))
    dims = adapter_for(model).dims(model.config)
    assert dims.fixed_head_dim and (dims.heads, dims.head_dim, dims.ffn) == (4, 12, 96)
    spec = ElasticSpec.uniform(dims, heads=2, ffn=40)
    masked = prioritize(make(kind))
    body = masked.base_model
    with torch.no_grad():
        for layer in body.layers:
            layer.attention.query_key_value.weight.view(dims.heads, 3, dims.head_dim, -1)[2:, 2] = 0
            layer.attention.query_key_value.bias.view(dims.heads, 3, dims.head_dim)[2:, 2] = 0
            layer.mlp.dense_4h_to_h.weight[:, 40:] = 0
    sub = extract(model, spec)
    attention = sub.base_model.layers[0].attention
    assert (attention.head_size, attention.scaling) == (dims.head_dim, dims.head_dim**-0.5)
    assert attention.query_key_value.weight.shape == (3 * 2 * dims.head_dim, dims.hidden)
    batch = inputs(kind)
    cut = output(sub, batch)
    assert (cut - output(masked, batch)).abs().max().item() <= 1e-5
    assert (cut - output(model, batch)).abs().max().item() > 1e-3  # the cut really changed the model


@pytest.mark.parametrize("overrides, message", [
    (dict(add_cross_attention=True), "add_cross_attention=True"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True"),
])
def test_gpt2_options_the_adapter_does_not_describe_are_refused(overrides: dict[str, object], message: str) -> None:
    """Refused by name, not mis-priced; a plain config is described, its FFN 4 x hidden wide where n_inner is None."""
    with pytest.raises(ValueError, match=message):
        adapter_for(GPT2Config(vocab_size=120, **{**GPT2, **overrides}))
    config = GPT2Config(vocab_size=120, **{**GPT2, "n_inner": None})
    assert adapter_for(config).name == "gpt2" and adapter_for(config).dims(config).ffn == 4 * GPT2["n_embd"]


@pytest.mark.parametrize("kind", ["modernbert", "modernbert-base", "modernbert-cls"])
def test_modernbert_keeps_whole_heads_and_the_same_glu_neurons_in_both_halves(kind: str) -> None:
    """ModernBERT's Wqkv rows are [q | k | v] ([3, heads, head_dim]) and its GLU's Wi rows [input | gate] ([2, ffn]):
    keeping 2 of 4 heads and 40 of 96 neurons keeps the leading 2 heads of each part and the leading 40 neurons of
    each half, so the sub-model computes exactly the global model with the other heads' value rows and the other
    neurons' Wo columns zeroed (they then add nothing); a depth cut keeps each layer's global or sliding attention."""
    model = prioritize(make(kind))
    dims = adapter_for(model).dims(model.config)
    assert dims.fixed_head_dim and (dims.heads, dims.head_dim, dims.ffn) == (4, 12, 96)
    spec = ElasticSpec.uniform(dims, heads=2, ffn=40)
    masked = prioritize(make(kind))
    with torch.no_grad():
        for layer in masked.base_model.layers:
            layer.attn.Wqkv.weight.view(3, dims.heads, dims.head_dim, -1)[2, 2:] = 0
            if layer.attn.Wqkv.bias is not None:
                layer.attn.Wqkv.bias.view(3, dims.heads, dims.head_dim)[2, 2:] = 0
            layer.mlp.Wo.weight[:, 40:] = 0
    sub = extract(model, spec)
    layer = sub.base_model.layers[0]
    assert layer.attn.head_dim == dims.head_dim
    assert layer.attn.Wqkv.weight.shape == (3 * 2 * dims.head_dim, dims.hidden)
    assert layer.mlp.Wi.weight.shape == (2 * 40, dims.hidden)
    assert torch.equal(layer.mlp.Wi.weight[40:], model.base_model.layers[0].mlp.Wi.weight[96:136])  # the gate half
    batch = inputs(kind)
    cut = output(sub, batch)
    assert (cut - output(masked, batch)).abs().max().item() <= 1e-5
    assert (cut - output(model, batch)).abs().max().item() > 1e-3  # the cut really changed the model
    shallow = extract(model, ElasticSpec.uniform(dims, heads=4, ffn=96, depth=2))
    assert [l.attention_type for l in shallow.base_model.layers] == ["full_attention", "sliding_attention"]


def test_modernbert_with_flash_attention_is_refused() -> None:
    """Flash attention unpads the batch (other kernels, other saved tensors): refused by name, not mis-priced."""
    from transformers import ModernBertConfig

    config = ModernBertConfig(vocab_size=120, attn_implementation="flash_attention_2", **MODERNBERT)
    with pytest.raises(ValueError, match="flash_attention"):
        adapter_for(config)
    assert adapter_for(ModernBertConfig(vocab_size=120, **MODERNBERT)).name == "modernbert"
