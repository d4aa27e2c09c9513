"""Harness for causal-LM jobs through the services: a tiny random-init Llama saved as an HF folder with a real fast
tokenizer over a 27-word vocabulary (BOS, EOS and pad like a Llama tokenizer's), and toy prompt -> response pairs
(two sentiment words among fillers -> " positive" / " negative")."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from raffm.generative import InstructionDataset

GOOD = ["great", "lovely", "superb", "bright", "moving", "warm"]
BAD = ["dull", "boring", "weak", "flat", "tired", "messy"]
FILLER = ["film", "plot", "cast", "the", "a", "and"]
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Review", ":", "Sentiment", "positive", "negative", *GOOD, *BAD, *FILLER]


def word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_llama_folder(path: Path, seed: int = 0, model_type: str = "llama", **overrides: Any) -> Path:
    """A random-init decoder of the Llama family (``model_type``: llama, qwen3, ...; 2 layers, hidden 128, 4 heads of
    32 dimensions over 2 KV groups, FFN 512, untied head; about 0.6 M parameters: large enough that device budgets in
    whole MiB pick different sub-models) or an OPT of the same sizes (``opt``: 4 plain heads, its head tied to the
    token embedding as every OPT checkpoint's) or a Phi (``phi``: 4 plain heads as every Phi checkpoint's, half of
    each rotating, an untied head with a bias) or a GPT-2 (``gpt2``: 4 heads from one fused projection, its head tied
    to the token embedding, dropout on as in every GPT-2 checkpoint) or a GPT-NeoX (``gpt_neox``: Pythia's layout, 4
    heads from one projection fused per head, a quarter of each rotating, parallel residuals, an untied head), and
    its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    values: dict[str, Any] = dict(vocab_size=len(WORDS), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type == "opt":  # its own name of the FFN width; embeddings as wide as the layers
        values.update(ffn_dim=512, word_embed_proj_dim=128)
    elif model_type == "phi":  # PhiConfig's default partial_rotary_factor (0.5)
        values.update(intermediate_size=512)
    elif model_type == "gpt2":  # its own name of the FFN width; GPT2Config's dropouts (0.1)
        values.update(n_inner=512)
    elif model_type == "gpt_neox":  # GPTNeoXConfig's defaults: rotary_pct 0.25, parallel residuals, no dropout
        values.update(intermediate_size=512)
    else:
        values.update(num_key_value_heads=2, head_dim=32, intermediate_size=512, tie_word_embeddings=False)
    values.update(overrides)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values)).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def toy_pairs(n: int, seed: int, template: str = "Review : {} Sentiment :") -> InstructionDataset:
    """Two sentiment words among two fillers, in ``template`` -> " positive" / " negative"."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        fresh = rng.random() < 0.5
        words = rng.sample(GOOD if fresh else BAD, 2) + rng.sample(FILLER, 2)
        rng.shuffle(words)
        prompts.append(template.format(" ".join(words)))
        responses.append(" positive" if fresh else " negative")
    return InstructionDataset(prompts, responses)


def write_jsonl(data: InstructionDataset, path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                            for p, r in zip(data.prompts, data.responses)), encoding="utf-8")
    return path
