"""Small random-init models of every supported architecture, shared by the core tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CamembertConfig,
    CamembertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    GPTNeoXModel,
    LlamaConfig,
    LlamaForCausalLM,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    ModernBertModel,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
    OPTModel,
    PhiConfig,
    PhiForCausalLM,
    PhiForSequenceClassification,
    PhiModel,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

SMALL = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96)
# DeBERTa-v3's layout: log-bucketed relative positions projected by each layer's own query and key, no absolute ones.
DEBERTA_V3: dict[str, Any] = dict(relative_attention=True, position_buckets=8, max_relative_positions=-1,
                                  pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                                  position_biased_input=False, type_vocab_size=0)
# DeBERTa-v2's older layout: absolute positions too, and separate projections of the relative ones.
DEBERTA_V2: dict[str, Any] = dict(relative_attention=True, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                                  share_att_key=False, position_biased_input=True, max_position_embeddings=64)

# OPT: a pre-LN decoder whose FFN has its own config name; embeddings as wide as the layers (word_embed_proj_dim).
OPT: dict[str, Any] = dict(hidden_size=SMALL["hidden_size"], word_embed_proj_dim=SMALL["hidden_size"],
                           num_hidden_layers=SMALL["num_hidden_layers"],
                           num_attention_heads=SMALL["num_attention_heads"], ffn_dim=SMALL["intermediate_size"],
                           max_position_embeddings=64, pad_token_id=1)

# Phi: half of every head's 12 dimensions rotate (partial rotary); the classifier's body has 2 KV heads of 2 queries.
PHI: dict[str, Any] = dict(**SMALL, max_position_embeddings=64, pad_token_id=0,
                           rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))

# GPT-2: its own config names, Conv1D projections and one fused q/k/v projection (n_inner None: an FFN of 4 x hidden).
GPT2: dict[str, Any] = dict(n_embd=SMALL["hidden_size"], n_layer=SMALL["num_hidden_layers"],
                            n_head=SMALL["num_attention_heads"], n_inner=SMALL["intermediate_size"], n_positions=64,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# GPT-NeoX (Pythia's layout): q/k/v fused per head, a quarter of every head's 12 dimensions rotating (rotary_pct).
NEOX: dict[str, Any] = dict(**SMALL, max_position_embeddings=64, pad_token_id=0)

# ModernBERT: rotary attention alternating global and sliding-window layers (a 6-token window, so the 12-token inputs
# see it), a GLU FFN; special token ids inside the small vocabulary.
MODERNBERT: dict[str, Any] = dict(**SMALL, max_position_embeddings=64, local_attention=6, global_attn_every_n_layers=2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
# Every optional bias of ModernBERT on (none by default), so their rules are exercised too.
MODERNBERT_BIASES: dict[str, Any] = dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True)


def _randomize_layernorms(model: PreTrainedModel) -> PreTrainedModel:
    """Non-trivial LayerNorm affine params, so a wrong permutation of them would show in the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = any(n in name for n in ("LayerNorm", "layernorm", "layer_norm", "ln_"))
            norm |= type(model).__name__.startswith("ModernBert") and "norm." in name  # norm, attn_norm, mlp_norm...
            if norm or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def make(kind: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    if kind == "bert":
        model: PreTrainedModel = BertForSequenceClassification(BertConfig(vocab_size=120, num_labels=3, **SMALL))
    elif kind == "bert-base":
        model = BertModel(BertConfig(vocab_size=120, **SMALL))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(
            RobertaConfig(vocab_size=120, max_position_embeddings=64, num_labels=3, **SMALL)
        )
    elif kind == "xlm-roberta":  # RoBERTa's layout under other class names (as CamemBERT)
        model = XLMRobertaForSequenceClassification(
            XLMRobertaConfig(vocab_size=120, max_position_embeddings=64, num_labels=3, **SMALL)
        )
    elif kind == "camembert":
        model = CamembertForSequenceClassification(
            CamembertConfig(vocab_size=120, max_position_embeddings=64, num_labels=3, **SMALL)
        )
    elif kind == "distilbert":  # its own module names, one hidden dropout per layer
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=120, max_position_embeddings=64, num_labels=3, dim=SMALL["hidden_size"],
            n_layers=SMALL["num_hidden_layers"], n_heads=SMALL["num_attention_heads"],
            hidden_dim=SMALL["intermediate_size"]))
    elif kind == "electra-base":  # embeddings as wide as the layers (ELECTRA-base/large), no projection
        model = ElectraModel(ElectraConfig(vocab_size=120, embedding_size=SMALL["hidden_size"], **SMALL))
    elif kind == "electra-small":  # narrower embeddings projected into the layers (ELECTRA-small)
        model = ElectraForSequenceClassification(
            ElectraConfig(vocab_size=120, embedding_size=16, num_labels=3, **SMALL)
        )
    elif kind in ("deberta", "deberta-v2"):
        layout = DEBERTA_V3 if kind == "deberta" else DEBERTA_V2
        model = DebertaV2ForSequenceClassification(DebertaV2Config(vocab_size=120, num_labels=3, **layout, **SMALL))
    elif kind == "opt":  # the causal LM, its head tied to the token embeddings
        model = OPTForCausalLM(OPTConfig(vocab_size=120, **OPT))
    elif kind == "opt-base":
        model = OPTModel(OPTConfig(vocab_size=120, **OPT))
    elif kind == "opt-classifier":  # scores every position, keeps the last non-padding one
        model = OPTForSequenceClassification(OPTConfig(vocab_size=120, num_labels=3, **OPT))
    elif kind == "phi":  # the causal LM, an untied head with a bias
        model = PhiForCausalLM(PhiConfig(vocab_size=120, **PHI))
    elif kind == "phi-base":
        model = PhiModel(PhiConfig(vocab_size=120, **PHI))
    elif kind == "phi-classifier":  # grouped-query attention; scores every position, keeps the last non-padding one
        model = PhiForSequenceClassification(PhiConfig(vocab_size=120, num_labels=3, num_key_value_heads=2, **PHI))
    elif kind == "gpt2":  # the causal LM, its head tied to the token embedding
        model = GPT2LMHeadModel(GPT2Config(vocab_size=120, **GPT2))
    elif kind == "gpt2-base":
        model = GPT2Model(GPT2Config(vocab_size=120, **{**GPT2, "n_inner": None}))
    elif kind == "gpt2-classifier":  # scores every position, keeps the last non-padding one
        model = GPT2ForSequenceClassification(GPT2Config(vocab_size=120, num_labels=3, **GPT2))
    elif kind == "neox":  # the causal LM, an untied head, parallel residuals (Pythia's)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=120, **NEOX))
    elif kind == "neox-base":  # sequential residuals, as GPT-NeoX-20B's
        model = GPTNeoXModel(GPTNeoXConfig(vocab_size=120, use_parallel_residual=False, **NEOX))
    elif kind == "neox-classifier":  # scores every position, keeps the last non-padding one
        model = GPTNeoXForSequenceClassification(GPTNeoXConfig(vocab_size=120, num_labels=3, **NEOX))
    elif kind == "modernbert":  # the sequence classifier, mean pooling, every optional bias on
        model = ModernBertForSequenceClassification(ModernBertConfig(
            vocab_size=120, num_labels=3, classifier_pooling="mean", **MODERNBERT_BIASES, **MODERNBERT))
    elif kind == "modernbert-base":  # the body, no biases (every ModernBERT checkpoint's layout)
        model = ModernBertModel(ModernBertConfig(vocab_size=120, **MODERNBERT))
    elif kind == "modernbert-cls":  # the classifier on the first token, no biases
        model = ModernBertForSequenceClassification(ModernBertConfig(vocab_size=120, num_labels=3, **MODERNBERT))
    elif kind == "llama-tied":  # a Llama whose LM head is its token embedding (SmolLM2's layout)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=120, tie_word_embeddings=True, **SMALL))
    elif kind == "vit":
        model = ViTForImageClassification(
            ViTConfig(image_size=28, patch_size=7, num_channels=1, num_labels=10, **SMALL)
        )
    elif kind == "vit-base":
        model = ViTModel(ViTConfig(image_size=28, patch_size=7, num_channels=1, **SMALL))
    else:
        raise ValueError(kind)
    return _randomize_layernorms(model)


def inputs(kind: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if kind.startswith("vit"):
        return {"pixel_values": torch.rand(batch, 1, 28, 28, generator=gen)}
    ids = torch.randint(3, 120, (batch, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # padding must be handled identically too
    return {"input_ids": ids, "attention_mask": mask}


def output(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
