"""End to end: `raffm demo` with a decoder LLM (issue 15) as a real process tree: federated LoRA on prompt -> response
pairs, three tiers of which one trains a slice, exact match and loss per round, and the per-tier memory table.

A tiny random-init Llama with a word-level tokenizer stands in for SmolLM2 (the real model's run is measured in
bench/results/2026-11-30-llm.md); its tiers are sized like the demo's: a slice + LoRA, the full model with
checkpointing, and the full model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from llmkit import tiny_llama_folder, toy_pairs, write_jsonl  # noqa: E402

# Budgets for the tiny Llama at batch 8 x 16 tokens, LoRA ranks 4/8/16 (the cost model's choices):
# 29 MiB: one of two KV groups, rank 4; 31 MiB: the full model with checkpointing, rank 16; 60 MiB: the full model.
TIERS = """
[tiers.phone]
memory_mb = 29
gflops = 10
up_mbps = 20
down_mbps = 80

[tiers.laptop]
memory_mb = 31
gflops = 20
up_mbps = 50
down_mbps = 200

[tiers.server]
memory_mb = 60
gflops = 100
up_mbps = 1000
down_mbps = 1000
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_federated_lora_on_a_decoder_llm(tmp_path: Path) -> None:
    model = tiny_llama_folder(tmp_path / "tiny-llama", tie_word_embeddings=True)  # tied, like SmolLM2
    data = write_jsonl(toy_pairs(400, seed=1), tmp_path / "pairs.jsonl")
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(TIERS)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "raffm_app", "demo", "--model", str(model), "--data", str(data), "--rounds", "1",
           "--local-steps", "3", "--seq-len", "16", "--lr", "3e-3", "--test-size", "40", "--tiers", str(tiers),
           "--round-deadline-s", "300", "--progress-s", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "federated LoRA, ranks 4, 8, 16" in proc.stdout
    assert "round 0: held-out exact match" in proc.stdout and "round 1: held-out exact match" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "exact match" and report["settings"]["task"] == "causal-lm"
    assert report["initial_loss"] > 0 and 0.0 <= report["initial_accuracy"] <= 1.0
    [rnd] = report["rounds"]
    assert rnd["participants"] == 3 and rnd["dropouts"] == 0 and rnd["eval_loss"] > 0
    # LoRA: the adapters go up, a small share of what full-model FedAvg would upload.
    assert rnd["bytes_up"] < 0.25 * rnd["full_fedavg_bytes"] / 2
    tiers_seen = rnd["tiers"]
    assert set(tiers_seen) == {"phone", "laptop", "server"}
    assert tiers_seen["phone"]["params"] < tiers_seen["server"]["params"] == tiers_seen["laptop"]["params"]
    for t in tiers_seen.values():
        assert t["devices"] == 1 and 0 < t["trained_params"] < t["params"] / 4
        assert t["predicted_memory_mb"] > 0 and t["peak_memory_mb"] > 0
    assert set(report["memory_by_tier"]) == {"phone", "laptop", "server"}
    md = (out / "report.md").read_text()
    assert "Training memory by device tier" in md and "test exact match" in md and "held-out loss" in md
    assert [p["target_fraction"] for p in report["scaling"]] == [0.25, 0.5, 0.75, 1.0]
    for name in ("accuracy.png", "bytes.png", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
