"""LoRA on a device's slice (raffm.lora): init and merge equivalence, frozen base, stable adapter names, clear errors;
on tiny random-init Llama, BERT, DeBERTa, OPT, Phi, GPT-2, GPT-NeoX and ModernBERT configs."""

from __future__ import annotations


import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from raffm.arch import adapter_for
from raffm.costs import MIB, CostModel
from raffm.elastic import extract
from raffm.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    adapter_state,
    apply_lora,
    base_weight_name,
    load_adapters,
    lora_modules,
    merge_lora,
    trainable_parameters,
)
from raffm.recipe import Recipe
from raffm.spec import ElasticSpec, LayerSpec, ModelDims
from tests.unit.models_fixtures import DEBERTA_V3

VOCAB = 128
LLAMA_T = DEFAULT_TARGETS["llama"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def llama(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def bert(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)  # type: ignore[call-arg]
    return BertForSequenceClassification(config).eval()


def deberta(seed: int = 0) -> PreTrainedModel:
    """DeBERTa-v3: its query and key projections also project the relative position embeddings."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(seed)
    config = DebertaV2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, num_labels=3, **DEBERTA_V3)
    return DebertaV2ForSequenceClassification(config).eval()


def opt(seed: int = 0) -> PreTrainedModel:
    """OPT: a causal LM with plain multi-head attention, its LM head tied to the token embedding."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=64, max_position_embeddings=32)
    return OPTForCausalLM(config).eval()


def phi(seed: int = 0) -> PreTrainedModel:
    """Phi: a causal LM with biased projections, attention and FFN in parallel, partial rotary embeddings."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    config = PhiConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, max_position_embeddings=32)
    return PhiForCausalLM(config).eval()


def gpt2(seed: int = 0) -> PreTrainedModel:
    """GPT-2: transformers' Conv1D projections (weights stored [in, out]), one fused q/k/v projection, a tied head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=32, bos_token_id=1,
                        eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


def neox(seed: int = 0) -> PreTrainedModel:
    """GPT-NeoX: one q/k/v projection fused per head, partial rotary embeddings, parallel residuals, an untied head."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=32)
    return GPTNeoXForCausalLM(config).eval()


def modernbert(seed: int = 0) -> PreTrainedModel:
    """ModernBERT: one fused q/k/v nn.Linear, a GLU FFN whose Wi holds input and gate rows, no biases."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(seed)
    config = ModernBertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=32, num_labels=3, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, local_attention=4)
    return ModernBertForSequenceClassification(config).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids(seed)).logits  # type: ignore[no-any-return]


def randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)


def dims_of(model: PreTrainedModel) -> ModelDims:
    return adapter_for(model).dims(model.config)


SMALL = ElasticSpec(hidden=64, layers=(LayerSpec(heads=1, head_dim=16, ffn=40), LayerSpec(heads=2, head_dim=16, ffn=96)))


# -- the wrapper ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,targets", [(llama, LLAMA_T), (bert, DEFAULT_TARGETS["bert"]),
                                          (deberta, DEFAULT_TARGETS["deberta-v2"]), (opt, DEFAULT_TARGETS["opt"]),
                                          (phi, DEFAULT_TARGETS["phi"]), (gpt2, DEFAULT_TARGETS["gpt2"]),
                                          (neox, DEFAULT_TARGETS["gpt_neox"]),
                                          (modernbert, DEFAULT_TARGETS["modernbert"])])
def test_wrapped_model_starts_equal_to_the_base_and_trains_only_adapters(make, targets) -> None:  # type: ignore[no-untyped-def]
    model = make()
    before = logits(model)
    names = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, targets=targets), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model), before)  # B = 0: exactly the base model
    modules = lora_modules(model)
    assert modules and all(isinstance(m, (torch.nn.Linear, Conv1D)) for m in modules.values())
    # the base tensors keep their names; adapters are named after the module and point at the weight they adapt
    assert names <= set(model.state_dict())
    state = adapter_state(model)
    assert all(base_weight_name(n) in names for n in state)
    expected = sum(4 * sum(m.weight.shape) for m in modules.values())
    assert trainable_parameters(model) == expected == sum(t.numel() for t in state.values())
    model.train()
    out = model(input_ids=ids(), labels=ids() if make in (llama, opt, phi, gpt2, neox) else torch.tensor([0, 2]))
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(state)  # nothing else gets a gradient
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in state if n.endswith("lora_B"))  # (A's is 0: B = 0)


def test_merge_reproduces_the_adapted_model_on_a_sub_model() -> None:
    sub = extract(llama(), SMALL)
    base_names = set(sub.state_dict())
    apply_lora(sub, LoRAConfig(rank=3, alpha=6.0, targets=LLAMA_T), generator=torch.Generator().manual_seed(0))
    randomize_b(sub)
    adapted = logits(sub)
    assert (adapted - logits(extract(llama(), SMALL))).abs().max() > 1e-3  # the adapters really change something
    merge_lora(sub)
    assert not lora_modules(sub) and set(sub.state_dict()) == base_names
    diff = (logits(sub) - adapted).abs().max().item()
    assert diff <= 1e-5, diff


def test_merge_folds_conv1d_adapters_into_the_stored_weight() -> None:
    """GPT-2's Conv1D stores W [in, out]: its adapters are B [in, r], A [r, out], and merging adds s B A to W itself
    (a transposed update would change the merged model's outputs), on a sub-model with one head kept."""
    spec = ElasticSpec(hidden=64, layers=(LayerSpec(heads=1, head_dim=16, ffn=40), LayerSpec(heads=3, head_dim=16,
                                                                                                ffn=96)))
    sub = extract(gpt2(), spec)
    base_names = set(sub.state_dict())
    apply_lora(sub, LoRAConfig(rank=3, alpha=6.0, targets=DEFAULT_TARGETS["gpt2"]),
               generator=torch.Generator().manual_seed(0))
    state = adapter_state(sub)
    assert state["transformer.h.0.attn.c_attn.lora_B"].shape == (64, 3)  # [in, r]
    assert state["transformer.h.0.attn.c_attn.lora_A"].shape == (3, 3 * 16)  # [r, out]: the kept head's q, k, v
    randomize_b(sub)
    adapted = logits(sub)
    assert (adapted - logits(extract(gpt2(), spec))).abs().max() > 1e-3  # the adapters really change something
    merge_lora(sub)
    assert not lora_modules(sub) and set(sub.state_dict()) == base_names
    assert isinstance(sub.transformer.h[0].attn.c_attn, Conv1D)
    diff = (logits(sub) - adapted).abs().max().item()
    assert diff <= 1e-5, diff


def test_adapters_round_trip_and_bad_inputs_say_what_is_wrong() -> None:
    model = apply_lora(llama(), LoRAConfig(rank=2, targets=LLAMA_T), generator=torch.Generator().manual_seed(0))
    randomize_b(model)
    state = adapter_state(model)
    other = apply_lora(llama(), LoRAConfig(rank=2, targets=LLAMA_T), generator=torch.Generator().manual_seed(5))
    load_adapters(other, state)
    assert torch.equal(logits(other), logits(model))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0, targets=LLAMA_T)
    with pytest.raises(ValueError, match="nope_proj"):
        apply_lora(llama(), LoRAConfig(rank=2, targets=("q_proj", "nope_proj")))
    with pytest.raises(ValueError, match="nn.Linear"):
        apply_lora(llama(), LoRAConfig(rank=2, targets=("self_attn",)))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2, targets=LLAMA_T))
    bad = dict(state)
    name = "model.layers.0.self_attn.k_proj.lora_A"
    bad[name] = torch.zeros(2, 63)
    with pytest.raises(ValueError, match=r"k_proj.*A \(2, 63\)"):
        load_adapters(other, bad)
    with pytest.raises(ValueError, match="missing"):
        load_adapters(other, {n: t for n, t in state.items() if n != name})


# -- the cost model ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,targets", [(llama, LLAMA_T), (bert, DEFAULT_TARGETS["bert"]),
                                          (deberta, DEFAULT_TARGETS["deberta-v2"]), (opt, DEFAULT_TARGETS["opt"]),
                                          (phi, DEFAULT_TARGETS["phi"]), (gpt2, DEFAULT_TARGETS["gpt2"]),
                                          (neox, DEFAULT_TARGETS["gpt_neox"]),
                                          (modernbert, DEFAULT_TARGETS["modernbert"])])
def test_cost_model_prices_the_real_wrapped_model(make, targets) -> None:  # type: ignore[no-untyped-def]
    model = make()
    cm = CostModel.from_model(model)
    spec = SMALL if make is llama else ElasticSpec.uniform(cm.dims, heads=2, ffn=24)
    recipe = Recipe(lora_rank=3, lora_targets=targets, lora_alpha=6.0)
    assert Recipe.from_dict(recipe.to_dict()) == recipe and recipe.lora == LoRAConfig(3, targets, 6.0)
    wrapped = apply_lora(extract(model, spec), recipe.lora)  # type: ignore[arg-type]
    lora, plain = cm.estimate(spec, batch_size=2, seq_len=8, recipe=recipe), cm.estimate(spec, batch_size=2, seq_len=8)
    adapters = trainable_parameters(wrapped)
    assert lora.trained_params == adapters and lora.params == plain.params == cm.params(spec)
    assert lora.upload_bytes == 4 * adapters  # a round's upload: the adapters
    assert lora.wire_bytes - lora.cached_bytes == 4 * adapters  # a round's download once the slice is cached
    assert lora.gradients_mb * MIB == 4 * adapters and lora.optimizer_mb == 2 * lora.gradients_mb
    assert lora.train_memory_mb < plain.train_memory_mb and lora.upload_bytes < 0.2 * plain.upload_bytes
    with pytest.raises(ValueError, match="lora_rank"):
        Recipe(lora_rank=-1)
    with pytest.raises(ValueError, match="targets"):
        Recipe(lora_rank=2)
    with pytest.raises(ValueError, match="match no weight"):
        cm.estimate(spec, batch_size=2, seq_len=8, recipe=Recipe(lora_rank=2, lora_targets=("nope",)))
