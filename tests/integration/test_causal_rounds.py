"""Causal-LM jobs through the real registry, extractor and aggregator: edge agents of two tiers fine-tune slices of
a tiny random-init Llama on prompt -> response pairs (a JSON-lines file, the built-in Rotten Tomatoes instructions),
and the aggregator scores every version by exact match and response loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raffm.planning import adapter_and_dims
from raffm.proto import spec_from_proto
from raffm.v1 import aggregator_pb2
from tests.integration.agentkit import AgentThread, Fleet, agent_config, job, rounds
from tests.integration.fedloop import budgets_for
from tests.integration.llmkit import tiny_llama_folder, toy_pairs, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# Llama, Qwen3 (an RMSNorm on every query and key head, which the extractor, the cost model and the slices must
# carry through a real round), OPT (plain multi-head attention, learned positions, a head tied to the embedding),
# Phi (attention and FFN in parallel, partial rotary embeddings, biases everywhere), GPT-2 (Conv1D projections, one
# fused q/k/v projection cut by whole heads, a tied head) and GPT-NeoX (q/k/v fused per head, parallel residuals).
@pytest.fixture(scope="module", params=["llama", "qwen3", "opt", "phi", "gpt2", "gpt_neox"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("model") / request.param, model_type=request.param)


def causal_job(model: Path, eval_file: Path, **overrides: object) -> object:
    values: dict[str, object] = dict(task="causal-lm", clients_per_round=2, quorum=2, min_updates=2, batch_size=4,
                                     seq_len=16, local_steps=2, lr=1e-3, eval_data=str(eval_file), calibrate=False)
    values.update(overrides)
    return job(model, **values)


def test_two_tiers_complete_a_causal_lm_round(tmp_path: Path, model: Path) -> None:
    train = write_jsonl(toy_pairs(24, seed=1), tmp_path / "train.jsonl")
    held_out = write_jsonl(toy_pairs(8, seed=2), tmp_path / "held-out.jsonl")
    fleet = Fleet(tmp_path, causal_job(model, held_out)).start()
    try:
        config = fleet.store.info("job-v0").config
        assert config["model_type"] == model.name
        small, large = budgets_for(fleet.job, config, ("bottom", "top"))
        runners = [
            AgentThread(agent_config(fleet, "pi", tmp_path / "pi", model, memory_mb=small, tier="sbc",
                                     data=str(train)), load_data=True).start(),
            AgentThread(agent_config(fleet, "laptop", tmp_path / "laptop", model, memory_mb=large, tier="laptop",
                                     data="rotten_tomatoes"), load_data=True).start(),
        ]
        for runner in runners:
            assert runner.join() == 0
            [outcome] = runner.agent.outcomes
            assert outcome.status == "uploaded", outcome
            assert outcome.samples == 8 and outcome.loss > 0  # 2 steps of 4 pairs, a response-token loss
            [a] = runner.assignments
            assert a.task.kind == aggregator_pb2.TASK_KIND_CAUSAL_LM
            decoders = ("opt", "phi", "gpt2", "gpt_neox")  # adapter names; the Llama family's is "llama"
            assert a.task.architecture == (model.name if model.name in decoders else "llama")
        specs = [spec_from_proto(r.assignments[0].spec) for r in runners]
        assert specs[0] != specs[1], "the two tiers trained the same sub-model"
        [rnd] = rounds(fleet)
        rnd = fleet.wait_round(fleet.agg_stub(), rnd.round_id)
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 2, rnd
        assert set(rnd.evaluation) >= {"exact_match", "loss"}, dict(rnd.evaluation)
        assert 0.0 <= rnd.evaluation["exact_match"] <= 1.0 and rnd.evaluation["loss"] > 0
        before, after = fleet.store.load("job-v0"), fleet.store.load(rnd.result_model_version)
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        # RaFFM keeps the embeddings and the first layer as pretrained (frozen_layers=1); the layer above trains, and
        # an untied LM head (OPT's and GPT-2's is its token embedding, held once under that name)
        adapter, _ = adapter_and_dims(config)
        assert any(adapter.layer_of(n) == 1 and f".{adapter.attention_module}." in n for n in changed)
        assert ("lm_head.weight" in changed) == ("lm_head.weight" in before)
        assert not any(adapter.below(n, 1) for n in changed)  # the first layer's tensors and the input embeddings
    finally:
        fleet.stop()


def test_causal_lm_data_and_job_settings(tmp_path: Path) -> None:
    from edge_agent.localdata import load_local_data
    from raffm.generative import InstructionDataset
    from services.aggregator.config import JobConfig
    from services.aggregator.evaluation import load_eval_data

    pairs = write_jsonl(toy_pairs(5, seed=3), tmp_path / "pairs.jsonl")
    data = load_local_data(str(pairs), task="causal-lm")
    assert isinstance(data, InstructionDataset) and len(data) == 5
    assert isinstance(load_eval_data(str(pairs), task="causal-lm", max_samples=2), InstructionDataset)
    with pytest.raises(ValueError, match="image data"):
        load_local_data("mnist", task="causal-lm")
    labelled = load_local_data(str(write_jsonl_rows(tmp_path / "labelled.jsonl", '{"text": "a", "label": 1}')),
                               task="causal-lm")  # a classifier's file: each text asked for its label
    assert isinstance(labelled, InstructionDataset) and labelled.responses == [" 1"]
    with pytest.raises(ValueError, match=r"line 1 has no label column .*; or give prompt -> response pairs"):
        load_local_data(str(write_jsonl_rows(tmp_path / "bad.jsonl", '{"text": "a"}')), task="causal-lm")
    assert JobConfig(task="causal-lm").task == "causal-lm"
    with pytest.raises(ValueError, match="no label names"):
        JobConfig(task="causal-lm", num_labels=2, labels=("a", "b"))


def write_jsonl_rows(path: Path, row: str) -> Path:
    path.write_text(row + "\n", encoding="utf-8")
    return path
