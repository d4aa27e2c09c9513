"""`raffm demo --model smollm2` (issue 15): a decoder LLM gets LoRA settings and device tiers sized for SmolLM2, and
the cost model really gives those tiers the sub-models the demo's comments say (one of them a slice)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raffm.costs import CostModel
from raffm.fitting import RoundBudget
from raffm.spec import ElasticSpec
from raffm.strategy import strategy_named
from raffm_app import demo


def smollm2_shapes() -> LlamaForCausalLM:
    """SmolLM2-135M's shapes (no weights): 30 layers, hidden 576, 9 query / 3 KV heads, FFN 1536, tied head."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def test_llm_tiers_get_a_slice_a_low_rank_and_the_full_model() -> None:
    s = demo.llm_settings()
    cm = CostModel.from_model(smollm2_shapes())
    assert cm.params(ElasticSpec.full(cm.dims)) == 134_515_008
    strategy = strategy_named(s.strategy).with_options(lora_ranks=s.lora_ranks)
    plans = {}
    for t in s.tiers:
        budget = RoundBudget(train_memory_mb=t.memory_mb, gflops=t.gflops, up_mbps=t.up_mbps, down_mbps=t.down_mbps,
                             deadline_s=s.round_deadline_s, batch_size=s.batch_size, seq_len=s.seq_len,
                             local_steps=s.local_steps)
        plans[t.name] = strategy.plan(cm, budget)
    full = ElasticSpec.full(cm.dims)
    phone, laptop, server = plans["phone"], plans["laptop"], plans["server"]
    assert phone.spec != full and phone.costs.params < 0.8 * cm.params(full)  # 99.1 M of 134.5 M
    assert (phone.recipe.lora_rank, phone.recipe.checkpointing) == (16, True)
    assert laptop.spec == full and (laptop.recipe.lora_rank, laptop.recipe.checkpointing) == (8, True)
    assert server.spec == full and (server.recipe.lora_rank, server.recipe.checkpointing) == (16, False)
    # The full model cannot train in the phone's budget, even at the smallest rank with checkpointing.
    assert min(r.costs.train_memory_mb for r in [laptop]) > phone.costs.train_memory_mb
    assert [round(p.costs.train_memory_mb) for p in (phone, laptop, server)] == [772, 885, 1529]


def test_llm_defaults_apply_unless_a_flag_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[demo.DemoSettings] = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: seen.append(settings))
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    args = parser.parse_args(["demo", "--model", "smollm2", "--rounds", "5", "--lora-ranks", "8"])
    assert args.func(args) == 0
    s = seen[-1]
    assert (s.rounds, s.lora_ranks, s.local_steps, s.devices, s.chat_template) == (5, (8,), 8, 3, True)
    assert not s.match_cuts  # a decoder LLM's cuts are scored by exact match
    assert [t.name for t in s.tiers] == ["phone", "laptop", "server"]
    args = parser.parse_args(["demo", "--rounds", "2"])
    assert args.func(args) == 0
    s = seen[-1]
    assert (s.model, s.rounds, s.local_steps) == ("minilm", 2, demo.DemoSettings.local_steps) and s.tiers == list(demo.DEFAULT_TIERS)
    assert s.match_cuts
    args = parser.parse_args(["demo", "--no-match-cuts"])
    assert args.func(args) == 0 and not seen[-1].match_cuts
    args = parser.parse_args(["demo", "--model", "smollm2", "--match-cuts"])
    with pytest.raises(ValueError, match="--match-cuts scores classifiers"):
        args.func(args)
    assert demo.is_llm("smollm2") and not demo.is_llm("minilm")


@pytest.mark.parametrize(("flags", "message"), [
    (["--local-steps", "-1"], "--local-steps is -1; it must be at least 0"),
    (["--lr", "0"], "--lr is 0.0; it must be > 0"),
    (["--batch-size", "0"], "--batch-size is 0; it must be at least 1"),
    (["--model", "./no-such-model"], "--model ./no-such-model: no such folder or file"),
])
def test_bad_settings_stop_the_demo_before_any_service_starts(monkeypatch: pytest.MonkeyPatch, flags: list[str],
                                                              message: str) -> None:
    started: list[demo.DemoSettings] = []
    monkeypatch.setattr(demo, "run_demo", lambda settings: started.append(settings))
    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers())
    args = parser.parse_args(["demo", *flags])
    with pytest.raises(ValueError, match=message):
        args.func(args)
    assert not started


def test_strategy_options_reach_the_aggregator_beside_the_llms_lora_ranks(tmp_path) -> None:
    from raffm.data import TextDataset
    from raffm.generative import InstructionDataset

    text = TextDataset(["good", "bad"], [1, 0], ("rotten", "fresh"))
    classifier = demo.DemoData(text, text, tmp_path / "a", tmp_path / "b")
    flags = demo.job_task_args(demo.DemoSettings(strategy_options='{"prior_correction": 1.0}'), classifier)
    assert flags[flags.index("--strategy-options") + 1] == '{"prior_correction": 1.0}' and "--num-labels" in flags
    assert "--strategy-options" not in demo.job_task_args(demo.DemoSettings(), classifier)
    pairs = InstructionDataset(("p",), (" positive",))
    llm = demo.DemoData(pairs, pairs, tmp_path / "a", tmp_path / "b")
    settings = demo.llm_settings(strategy_options='{"server_momentum": 0}')
    flags = demo.job_task_args(settings, llm)
    assert json.loads(flags[flags.index("--strategy-options") + 1]) == {"server_momentum": 0,
                                                                       "lora_ranks": list(settings.lora_ranks)}
    for bad in ("[1]", "{x"):
        with pytest.raises(ValueError, match="--strategy-options"):
            demo.strategy_options(demo.DemoSettings(strategy_options=bad))


def test_a_distilling_strategy_gets_unlabelled_server_data_that_no_device_and_no_test_holds(tmp_path) -> None:
    from raffm.data import TextDataset, load_text_file

    data = TextDataset([f"review number {i}" for i in range(100)], [i % 2 for i in range(100)], ("rotten", "fresh"))
    plain = demo.split_and_write(demo.DemoSettings(test_size=20, match_cuts=False), data, tmp_path / "plain")
    assert plain.distill_path is None and len(plain.train) == 80
    distilling = '{"nested_fractions": [0.5], "server_distill_steps": 5}'
    settings = demo.DemoSettings(test_size=20, distill_size=30, strategy_options=distilling)
    split = demo.split_and_write(settings, data, tmp_path / "distil")
    assert split.distill_path is not None and len(split.train) == 50 and len(split.test) == 20
    rows = [json.loads(line) for line in split.distill_path.read_text().splitlines()]
    assert len(rows) == 30 and all(set(r) == {"text"} for r in rows)  # no labels leave for the server
    served = {r["text"] for r in rows}
    assert not served & (set(split.test.texts) | set(split.train.texts))
    assert len(load_text_file(split.distill_path, label_column=None)) == 30
    with pytest.raises(ValueError, match="--distill-size 90 leave no training data"):
        demo.split_and_write(demo.DemoSettings(test_size=20, distill_size=90, strategy_options=distilling), data,
                             tmp_path / "x")
    with pytest.raises(ValueError, match="unknown strategy setting"):
        demo.distils(demo.DemoSettings(strategy_options='{"server_distil_steps": 5}'))


def test_the_cuts_are_matched_on_unlabelled_inputs_drawn_from_the_fleets_share_which_it_still_trains_on(
        tmp_path) -> None:
    from raffm.data import TextDataset, load_text_file

    data = TextDataset([f"review number {i}" for i in range(100)], [i % 2 for i in range(100)], ("rotten", "fresh"))
    assert demo.DemoSettings().match_cuts and not demo.llm_settings().match_cuts  # the default, for classifiers
    split = demo.split_and_write(demo.DemoSettings(test_size=20, distill_size=30), data, tmp_path / "matched")
    assert split.distill_path is not None and len(split.train) == 80  # the fleet keeps every training example
    served = load_text_file(split.distill_path, label_column=None).texts
    assert len(served) == 30 and set(served) <= set(split.train.texts) and not set(served) & set(split.test.texts)
    assert all(set(json.loads(line)) == {"text"} for line in split.distill_path.read_text().splitlines())
    plain = demo.split_and_write(demo.DemoSettings(test_size=20, match_cuts=False), data, tmp_path / "plain")
    assert plain.train.texts == split.train.texts  # matching changes nothing the fleet trains on
    small = demo.split_and_write(demo.DemoSettings(test_size=92), data, tmp_path / "small")
    assert small.distill_path is None and len(small.train) == 8  # too few to match a cut on
