"""End to end: `raffm demo` as a real process tree (three services + simulated agents) on a tiny random BERT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from raffm.checkpoints import checkpoint_store_from_url
from raffm.models import default_model_path

TIERS = """
[tiers.sbc]
memory_mb = 39
gflops = 5
up_mbps = 10
down_mbps = 40

[tiers.phone]
memory_mb = 44
gflops = 10
up_mbps = 20
down_mbps = 80

[tiers.server]
memory_mb = 200
gflops = 100
up_mbps = 1000
down_mbps = 1000
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_three_agents_for_two_rounds(tiny_model: Path, tmp_path: Path) -> None:
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(TIERS)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "raffm_app", "demo", "--model", str(tiny_model), "--devices", "3", "--rounds", "2",
           "--local-steps", "3", "--seq-len", "64", "--test-size", "120", "--max-train", "600", "--tiers", str(tiers),
           "--round-deadline-s", "120", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560)
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    report = json.loads((out / "report.json").read_text())
    assert [r["index"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert r["participants"] == 3 and r["dropouts"] == 0
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
        # Two of the three tiers train a slice: less traffic than a full-model FedAvg round.
        assert r["bytes_down"] + r["bytes_up"] < r["full_fedavg_bytes"]
        # The per-tier split (from the aggregator's /metrics) adds up to the round's totals (from its status RPC).
        assert sum(t["down"] for t in r["bytes_by_tier"].values()) == r["bytes_down"]
        assert sum(t["up"] for t in r["bytes_by_tier"].values()) == r["bytes_up"]
        assert set(r["bytes_by_tier"]) == {"sbc", "phone", "server"}
    assert report["totals"]["bytes_saved"] > 0
    assert [p["target_fraction"] for p in report["scaling"]] == [0.25, 0.5, 0.75, 1.0]
    assert report["scaling"][-1]["param_fraction"] == 1.0
    assert report["majority_rate"] >= 0.5 and report["machine"]["cores"] >= 1
    for name in ("report.md", "accuracy.png", "bytes.png", "scaling.png"):
        assert (out / name).stat().st_size > 0, name
    assert "Inference scaling" in (out / "report.md").read_text()
    assert "round 2: global test accuracy" in proc.stdout

    # The global model really changed: the final version differs from version 0 (SPP-ordered pretrained).
    store = checkpoint_store_from_url(str(out / "checkpoints"))
    versions = [v.version for v in store.versions()]
    assert len(versions) == 3, versions
    first, last = store.load(versions[0]), store.load(versions[-1])
    assert any(not torch.equal(first[k], last[k]) for k in first)
