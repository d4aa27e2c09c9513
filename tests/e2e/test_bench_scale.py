"""bench/bench_scale.py's control part at its CI size, as a user runs it: 60 devices register and poll real services
(SQLite), and a round of 20 participants closes. The bench drives the product's process group and CLIs, so a change
there that the bench does not follow fails here rather than in the next person's measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_control_part_registers_every_device_and_closes_a_round(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--quick", "--parts", "control",
                           "--postgres-url", "", "--json", str(out), "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (control,) = json.loads(out.read_text())["control"]
    assert control["backend"] == "sqlite"
    assert control["registered"] == control["devices"] == 60
    assert control["round"]["state"] == "ROUND_STATE_CLOSED"
    assert control["round"]["accepted"] == 20
    assert control["latency_ms"]["aggregator.PollRound"]["count"] > 0
    # every service's peak resident memory, sampled while the fleet ran (the registry never loads torch)
    peak = control["peak_rss_mb"]
    assert set(peak) == {"registry", "aggregator", "extractor"} and all(v > 20 for v in peak.values())
    assert peak["registry"] < peak["aggregator"]


def test_quick_store_and_memory_parts_move_real_slices_and_updates(tmp_path: Path) -> None:
    """The store part downloads slices through the directory store and a real S3 server and uploads an update for
    each; the memory part folds a round of uploads. A slice whose frozen vocabulary comes at half precision must
    still be answered with an update at the job's wire dtype (the aggregator refuses anything else)."""
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_scale.py"), "--quick", "--parts", "store,memory",
                           "--json", str(out), "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [s["store"] for s in data["store"]] == ["directory", "object store (S3 API)"]
    for store in data["store"]:
        assert store["last_round"] == 2 and len(store["round_s"]) == 2
        assert store["cold_mb_s"] and all(v > 0 for v in store["cold_mb_s"] + store["warm_mb_s"])
    assert [m["participants"] for m in data["memory"]] == [4, 8]
