"""bench/bench_transfer.py at its quick size, as a user runs it: slices down and updates up through the real services
with the agent's stubs, the raw socket and disk beside them; the stage breakdown and two devices at once, or the
extractor and the aggregator as processes of their own. The bench drives the product's transfer code, so a change
there that the bench does not follow fails here rather than in the next person's measurement."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("services_processes", [False, True], ids=["one-process", "services-processes"])
def test_quick_transfer_bench_moves_every_byte_and_reports_each_stage(tmp_path: Path, services_processes: bool) -> None:
    out = tmp_path / "transfer.json"
    extra = (["--extractor-process", "--aggregator-process"] if services_processes
             else ["--breakdown", "--concurrency", "2"])
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_transfer.py"), "--quick", "--json", str(out),
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["extractor_process"] is r["aggregator_process"] is services_processes
    assert r["tensor_bytes"] > r["upload_bytes"] > 0  # the frozen vocabulary goes down, not up
    for path in ("download", "upload"):
        assert r[f"{path}_mb_s"] > 0 and r[f"{path}_ratio"] == r[f"{path}_mb_s"] / r["raw_socket_mb_s"]
        assert 1.0 < r[f"wire_overhead_{path}"] < 1.01  # framing only: each byte crosses the socket once
    if not services_processes:
        assert {"sha256 (verify)", "decode (receiver, views)", "stage: write + sha256 + fsync (commit)",
                "validate + fold from staged mmap"} <= set(r["breakdown_mb_s"])
        (pair,) = r["concurrent"]
        assert pair["devices"] == 2 and pair["download_mb_s"] > 0 and pair["upload_mb_s"] > 0
