"""The edge agent against the real registry, extractor and aggregator: a full round, identity across restarts,
and an agent that starts before the services do."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from edge_agent.state import STATE_FILE
from raffm.proto import recipe_from_proto
from raffm.v1 import aggregator_pb2
from tests.integration.agentkit import (
    AgentThread, Fleet, FixedPortFleet, agent_config, job, list_devices, rounds, tiny_model, toy_data, wait_for,
)
from tests.unit.models_fixtures import DEBERTA_V3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


def test_agent_completes_a_round_and_reports_its_measurements(tmp_path: Path, model: Path) -> None:
    fleet = Fleet(tmp_path, job(model)).start()
    try:
        data = toy_data(21)  # 10 "dull" reviews, 11 "great"
        runner = AgentThread(agent_config(fleet, "pi-1", tmp_path / "state", model), data=data).start()
        assert runner.join() == 0
        [outcome] = runner.agent.outcomes
        assert outcome.status == "uploaded", outcome
        assert outcome.peak_memory_mb > 0 and outcome.predicted_mb > 0
        [rnd] = rounds(fleet)
        rnd = fleet.wait_round(fleet.agg_stub(), rnd.round_id)
        assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED
        assert rnd.accepted == 1 and rnd.bytes_up > 0 and rnd.result_model_version
        # its data's labels, one count per label: the fleet's label prior as the server sees it
        assert list(rnd.label_counts) == [data.labels.count(0), data.labels.count(1)] == [10, 11]
        # the state file holds the identity, readable by the owner only, and no temporary files are left
        state_file = tmp_path / "state" / STATE_FILE
        saved = json.loads(state_file.read_text())
        assert saved["device_id"] == list_devices(fleet)[0].device_id and saved["token"]
        assert stat.S_IMODE(os.stat(state_file).st_mode) == 0o600
        assert saved["rounds_done"] == 1
        assert not list((tmp_path / "state").glob(".agent-state-*"))
    finally:
        fleet.stop()


def test_a_probe_round_moves_only_the_head_and_the_next_round_does_not_download_the_body_again(
    tmp_path: Path, model: Path
) -> None:
    fleet = Fleet(tmp_path, job(model, rounds=2, strategy_options={"probe_rounds": 1})).start()
    try:
        runner = AgentThread(agent_config(fleet, "pi-probe", tmp_path / "state", model, max_rounds=2)).start()
        assert runner.join() == 0
        assert [o.status for o in runner.agent.outcomes] == ["uploaded", "uploaded"]
        probe, tune = (recipe_from_proto(a.recipe) for a in runner.assignments)
        first, second = sorted((fleet.wait_round(fleet.agg_stub(), r.round_id) for r in rounds(fleet)),
                               key=lambda r: r.index)
        v0, v1, v2 = (fleet.store.load(v) for v in ("job-v0", first.result_model_version,
                                                      second.result_model_version))
        head = {"classifier.weight", "classifier.bias"}
        assert set(v0) - probe.frozen == head and probe.lr_scale == 10.0 and not head & tune.frozen
        assert {n for n in v0 if not torch.equal(v0[n], v1[n])} == head  # the body is version 0's, bit for bit
        assert {n for n in v0 if not torch.equal(v1[n], v2[n])} == set(v0) - tune.frozen
        # the server's momentum starts with fine-tuning: the probe round's head step is not carried into round 2
        assert sorted(p.name for p in (tmp_path / "agg" / "server_state").glob("*.momentum.*")) == [
            f"{second.result_model_version}.momentum.safetensors"]
        # round 1 uploads a head; round 2 downloads little more than one, since the device kept the body
        assert first.bytes_up < second.bytes_up / 100
        assert second.bytes_down < first.bytes_down / 100
    finally:
        fleet.stop()


def _one_round(tmp_path: Path, model: PreTrainedModel, **settings: Any
               ) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model`` (a random-init model of another family, with MiniLM's tokenizer) trained by one agent for one round
    through the services, with the job's ``settings``: the agent's runner, version 0 and the merged version (every
    shape kept)."""
    from transformers import AutoTokenizer

    from raffm.models import default_model_path

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    fleet = Fleet(tmp_path, job(folder, **settings)).start()
    try:
        runner = AgentThread(agent_config(fleet, "pi", tmp_path / "state", folder)).start()
        assert runner.join() == 0
        assert [o.status for o in runner.agent.outcomes] == ["uploaded"]
        [rnd] = rounds(fleet)
        rnd = fleet.wait_round(fleet.agg_stub(), rnd.round_id)
        v0, v1 = (fleet.store.load(v) for v in ("job-v0", rnd.result_model_version))
        assert {n: t.shape for n, t in v0.items()} == {n: t.shape for n, t in v1.items()}
        return runner, v0, v1
    finally:
        fleet.stop()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_jobs_optimizer_reaches_the_device(tmp_path: Path, optimizer: str) -> None:
    """One step at lr 1e-3: AdamW's first step moves every head weight by the lr (against its gradient's sign), plain
    SGD by the lr x its gradient, which differs from weight to weight."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    _, v0, v1 = _one_round(tmp_path, BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)),
        optimizer=optimizer, local_steps=1, lr=1e-3)
    step = (v1["classifier.weight"] - v0["classifier.weight"]).abs()
    assert (float(step.std() / step.mean()) < 0.01) == (optimizer == "adamw")


def test_an_electra_whose_embeddings_are_narrower_than_its_layers_trains_a_round(tmp_path: Path) -> None:
    """ELECTRA-small's layout: 16-wide embeddings projected into 32-wide layers. The device builds its slice from the
    manifest's config, trains above its frozen embeddings and projection, and the merged version keeps every shape."""
    from transformers import ElectraConfig, ElectraForSequenceClassification

    torch.manual_seed(0)
    runner, v0, v1 = _one_round(tmp_path, ElectraForSequenceClassification(ElectraConfig(
        vocab_size=30522, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=2)))
    [assignment] = runner.assignments
    assert "electra.embeddings_project.weight" in recipe_from_proto(assignment.recipe).frozen
    assert v1["electra.embeddings.word_embeddings.weight"].shape == (30522, 16)
    assert not torch.equal(v0["classifier.out_proj.weight"], v1["classifier.out_proj.weight"])


def test_a_deberta_v3_trains_a_round(tmp_path: Path) -> None:
    """DeBERTa-v3's disentangled attention: every layer projects the shared relative position embeddings with its own
    (cut) query and key. The device trains its slice with nested cuts (the job asks for them) and uploads; the merged
    version keeps every shape and moves the layers above the frozen first one."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    runner, v0, v1 = _one_round(tmp_path, DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, **{**DEBERTA_V3, "position_buckets": 16})),
        strategy_options={"nested_fractions": [0.25, 0.5, 0.75]})
    [assignment] = runner.assignments
    assert assignment.task.architecture == "deberta-v2"  # the model's adapter, not the task's usual family
    assert recipe_from_proto(assignment.recipe).nested, "the device should train nested cuts of its slice"
    changed = {n for n in v0 if not torch.equal(v0[n], v1[n])}
    assert "deberta.encoder.layer.1.attention.self.query_proj.weight" in changed
    assert not any(".layer.0." in n or "embeddings" in n for n in changed)


def test_an_opt_sequence_classifier_trains_a_round(tmp_path: Path) -> None:
    """A decoder as a text classifier: OPT scores every position with a fresh head and keeps the last non-padding
    one. The device trains its slice above the frozen first layer; the merged version moves the second layer and the
    head, never the first layer or the embeddings."""
    from transformers import OPTConfig, OPTForSequenceClassification

    torch.manual_seed(0)
    runner, v0, v1 = _one_round(tmp_path, OPTForSequenceClassification(OPTConfig(
        vocab_size=30522, hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)))  # MiniLM's tokenizer pads with 0
    assert runner.assignments[0].task.architecture == "opt"
    changed = {n for n in v0 if not torch.equal(v0[n], v1[n])}
    assert {"score.weight", "model.decoder.layers.1.self_attn.q_proj.weight"} <= changed
    assert not any(".layers.0." in n or "embed_" in n for n in changed)


def test_a_modernbert_sequence_classifier_trains_a_round(tmp_path: Path) -> None:
    """ModernBERT: a fused q/k/v projection cut by whole heads, a GLU FFN whose fused input keeps the same neurons in
    both halves, global and sliding-window layers with rotary embeddings. The device builds its slice from the
    manifest, trains it above its frozen first layer and uploads; the merged version keeps every shape and moves the
    layers above the first and the classifier, never the first layer or the embeddings."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(0)
    runner, v0, v1 = _one_round(tmp_path, ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, local_attention=8, global_attn_every_n_layers=2,
        pad_token_id=0, cls_token_id=101, sep_token_id=102, bos_token_id=101, eos_token_id=102)))  # MiniLM's ids
    assert runner.assignments[0].task.architecture == "modernbert"
    changed = {n for n in v0 if not torch.equal(v0[n], v1[n])}
    assert {"classifier.weight", "model.layers.1.attn.Wqkv.weight", "model.layers.1.mlp.Wi.weight"} <= changed
    assert not any(".layers.0." in n or "embeddings" in n for n in changed)


def test_restarted_agent_keeps_its_identity(tmp_path: Path, model: Path) -> None:
    fleet = Fleet(tmp_path, job(model, rounds=2)).start()
    try:
        config = agent_config(fleet, "pi-restart", tmp_path / "state", model)
        first = AgentThread(config).start()
        assert first.join() == 0
        device_id = first.agent.identity.device_id
        second = AgentThread(config).start()  # a new process would read the same state directory
        assert second.join() == 0
        assert second.agent.identity.device_id == device_id
        assert [o.status for o in first.agent.outcomes + second.agent.outcomes] == ["uploaded", "uploaded"]
        devices = list_devices(fleet)
        assert [d.device_id for d in devices] == [device_id]  # no second device registered
        # both rounds were done by the same device
        assert sorted(r.accepted for r in rounds(fleet)) == [1, 1]
    finally:
        fleet.stop()


def test_agent_started_before_the_services_connects_when_they_come_up(tmp_path: Path, model: Path) -> None:
    fleet = FixedPortFleet(tmp_path, job(model))
    config = agent_config(None, "early-bird", tmp_path / "state", model, registry=fleet.target("registry"),
                          aggregator=fleet.target("aggregator"), extractor=fleet.target("extractor"))
    runner = AgentThread(config).start()
    try:
        # the agent is up and retrying (with backoff) against ports where nothing listens yet
        wait_for(lambda: runner.agent.client.retries >= 3, "the agent to retry registration")
        assert runner.thread.is_alive()
        assert runner.agent.identity is not None and not runner.agent.identity.state.registered
        fleet.start()
        assert runner.join() == 0
        assert [o.status for o in runner.agent.outcomes] == ["uploaded"]
        assert len(list_devices(fleet)) == 1
    finally:
        if runner.thread.is_alive():
            runner.stop()
        fleet.stop()
