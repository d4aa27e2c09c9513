"""bench/bench_scale.py's own arithmetic: quantile bounds from a Prometheus histogram, and the report renders every
part (the bench itself runs from bench/, at sizes a test suite cannot afford)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_scale.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("bench_scale_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


METRICS = "\n".join(
    f'raffm_grpc_server_handling_seconds_bucket{{code="OK",method="PollRound",service="x",le="{le}"}} {n}'
    for le, n in (("0.005", 50.0), ("0.01", 90.0), ("0.05", 99.0), ("0.1", 100.0), ("+Inf", 100.0)))


def test_histogram_quantile_bounds() -> None:
    bench = _load()
    assert bench.histogram_quantile(METRICS, "raffm_grpc_server_handling_seconds", "PollRound", 0.5) == 5.0
    assert bench.histogram_quantile(METRICS, "raffm_grpc_server_handling_seconds", "PollRound", 0.99) == 50.0
    assert bench.histogram_quantile(METRICS, "raffm_grpc_server_handling_seconds", "Heartbeat", 0.5) is None
    assert bench.percentile([float(i) for i in range(1, 101)], 0.99) == 99.0


def test_render_reports_every_part() -> None:
    bench = _load()
    lat = {"count": 10, "p50": 1.0, "p99": 2.0, "max": 3.0}
    data = {
        "cores": 2, "command": "bench/bench_scale.py",
        "settings": {"participants": 200, "poll_wait_s": 5.0, "liveness_s": 90.0, "fleet_procs": 4,
                     "probe_devices": 10, "store_model": "minilm"},
        "control": [{"backend": "sqlite", "devices": 1000, "registered": 1000,
                     "latency_ms": {"aggregator.PollRound": lat, "registry.Heartbeat": lat},
                     "probe_latency_ms": {"aggregator.PollRound": {"count": 7, "p50": 4.0, "p99": 8.0, "max": 9.0}},
                     "server_bound_ms": {"PollRound": {"p50": 5.0, "p99": 50.0}, "Heartbeat": {"p50": 5.0, "p99": 25.0}},
                     "round": {"state": "ROUND_STATE_CLOSED", "accepted": 200, "assigned": 200, "seconds": 60.0},
                     "load_avg_1m": {"mean": 3.0, "max": 5.0},
                     "peak_rss_mb": {"registry": 81.4, "aggregator": 620.0, "extractor": 450.6},
                     "cpu_s": {"registry": 57.2, "aggregator": 81.0, "extractor": 2.6},
                     "registry_calls": {"VerifyToken": 4386, "Heartbeat": 6362, "GetDevice": 609, "Register": 1016}}],
        "store": [{"store": "directory", "devices": 8, "round_s": [3.0, 2.0], "cold_mb_s": [100.0],
                   "warm_mb_s": [200.0], "extractor_rss_mb": 500.0}],
        "memory": [{"participants": 10, "model_mb": 21.0, "rss_before_mb": 500.0, "rss_peak_mb": 600.0,
                    "close_s": 0.1, "fold_ms_mean": 5.0}],
    }
    text = bench.render(data)
    assert "| sqlite | 1000/1000 |" in text and "200, 60.0 s" in text
    assert "| 3.0, 5.0 | 81, 620, 451 | 57, 81, 3 | 4,386, 6,362, 609 |" in text
    assert "(10 probe devices)" in text and "| 4.0 / 8.0 (7 calls) |" in text
    assert "| directory | 100" in text and "| 10 | 500 | 600 | 0.10 | 5.0 |" in text
