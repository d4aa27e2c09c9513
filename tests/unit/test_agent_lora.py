"""The agent's side of a federated LoRA round: a download of a base slice plus the server's adapters builds the
sub-model with those adapters, trains them only, and the update (and what the agent uploads) is the adapters'
delta; the recipe's LoRA fields survive the wire."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edge_agent.trainer import MemoryMeter, is_adapter, run_local_round
from raffm.elastic import plan_for
from raffm.generative import InstructionDataset
from raffm.lora import A_SUFFIX, B_SUFFIX
from raffm.lora_fed import init_global_update, lora_update, redistribute
from raffm.proto import recipe_from_proto, recipe_to_proto
from raffm.recipe import Recipe
from raffm.slicing import slice_state
from raffm.spec import ElasticSpec, LayerSpec
from raffm.training import LocalConfig
from raffm.v1 import common_pb2
from tests.integration.llmkit import WORDS, toy_pairs, word_tokenizer

TARGETS = ("q_proj", "v_proj")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_recipe_lora_fields_round_trip_and_default_to_plain_fine_tuning() -> None:
    recipe = Recipe(lora_rank=4, lora_targets=TARGETS, lora_alpha=8.0, base_dtype="float16")
    assert recipe_from_proto(recipe_to_proto(recipe)) == recipe
    older = recipe_from_proto(common_pb2.TrainingRecipe())  # an older server's message
    assert older.lora is None and older.base_dtype == "float32"
    assert recipe_from_proto(common_pb2.TrainingRecipe(lora_rank=2, lora_targets=["q_proj"])).lora_alpha == 16.0


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16])
def test_a_lora_round_trains_the_servers_adapters_on_the_cached_base(tmp_path: Path, base_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    spec = ElasticSpec(hidden=64, layers=(LayerSpec(heads=1, head_dim=16, ffn=64),) * 2)
    plan = plan_for(model, spec)
    base = slice_state(model.state_dict(), plan)
    # a global update of rank > 2, so the rank-2 download truncates it
    update = {n: torch.randn(u.shape) * 0.01 for n, u in init_global_update(model.state_dict(), TARGETS).items()}
    recipe = Recipe(lora_rank=2, lora_targets=TARGETS, lora_alpha=4.0)
    adapters = redistribute(update, plan, 2, recipe.lora.scaling)  # type: ignore[union-attr]
    data: InstructionDataset = toy_pairs(16, seed=0)
    # the base as the extractor sends it (a LoRA recipe's base_dtype), the adapters at the job's wire dtype
    tensors = {**{n: t.to(base_dtype) for n, t in base.items()}, **{n: t.clone() for n, t in adapters.items()}}
    meter = MemoryMeter()
    meter.start()
    result = run_local_round(tensors, global_config=config, spec=spec, data=data, tokenizer=word_tokenizer(),
                             local=LocalConfig(batch_size=4, seq_len=16, lr=1e-2, local_steps=3),
                             spill_path=tmp_path / "received.pt", meter=meter, recipe=recipe, task="causal-lm")
    assert set(result.delta) == set(adapters) and all(map(is_adapter, result.delta))
    for name, d in result.delta.items():
        assert d.shape == adapters[name].shape and d.dtype == torch.float32
    assert any(d.abs().sum() > 0 for n, d in result.delta.items() if n.endswith(B_SUFFIX))
    assert result.samples == 12 and not (tmp_path / "received.pt").exists()
    # the server turns the uploaded factors into a dense update of the slice's target weights
    trained = {n: adapters[n] + d for n, d in result.delta.items()}
    dense = lora_update(adapters, trained, plan, recipe.lora.scaling)  # type: ignore[union-attr]
    assert set(dense) == {n[: -len(A_SUFFIX)] + ".weight" for n in adapters if n.endswith(A_SUFFIX)}
    assert all(tuple(dense[n].shape) == plan[n].sub_shape for n in dense)


def test_adapters_without_a_lora_recipe_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoRA rank"):
        run_local_round({"model.layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 4)}, global_config=LlamaConfig(),
                        spec=ElasticSpec(hidden=4, layers=()), data=toy_pairs(2, seed=0), tokenizer=None,
                        local=LocalConfig(), spill_path=tmp_path / "r.pt", meter=MemoryMeter())
