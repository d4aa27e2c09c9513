"""Device reports: what a round really cost a device (from its upload header, plus what the aggregator measured of
the upload itself), stored with the assignment, exported as metrics by tier (never by device), and turned into the
calibration observations that planning reads (:mod:`raffm.calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from raffm.calibration import Observation, observe, ratios
from services.aggregator.metrics import AggregatorMetrics
from services.aggregator.store import AssignmentRecord, RoundStore

# TrainMetrics fields carried into the report (raffm.v1.TrainMetrics).
HEADER_FIELDS = ("loss", "steps", "seconds", "peak_memory_mb", "accuracy", "download_bytes", "step_seconds", "samples",
                 "download_seconds", "download_mbps", "upload_mbps")


def header_metrics(m: Any) -> dict[str, Any]:
    """An upload header's raffm.v1.TrainMetrics as a plain dict: its figures (what the report keeps), and the
    ``label_counts`` of the device's data when it sent them (the update row keeps them too; see Round.label_counts)."""
    out: dict[str, Any] = {name: getattr(m, name) for name in HEADER_FIELDS}
    if m.label_counts:
        out["label_counts"] = [int(c) for c in m.label_counts]
    return out


def _finite(x: float) -> float:
    return float(x) if math.isfinite(float(x)) else 0.0


def build_report(device: Mapping[str, Any], *, sample_count: int, upload_bytes: int, upload_seconds: float,
                 round_seconds: float, at: float) -> dict[str, float]:
    """The stored report: the device's figures, the samples it trained (the FedAvg weight), and what the aggregator
    saw itself: the upload's bytes and duration (its throughput replaces the device's figure for the previous
    upload, which is kept as ``device_upload_mbps``) and the round time from assignment to acceptance."""
    report = {k: _finite(v) for k, v in device.items() if isinstance(v, (int, float))}
    report["device_upload_mbps"] = report.pop("upload_mbps", 0.0)
    report["samples"] = float(sample_count)
    report["upload_bytes"] = float(upload_bytes)
    report["upload_seconds"] = max(upload_seconds, 0.0)
    report["upload_mbps"] = 8.0 * upload_bytes / upload_seconds / 1e6 if upload_seconds > 0 and upload_bytes else 0.0
    report["round_seconds"] = max(round_seconds, 0.0)
    report["reported_at"] = at
    return report


def tier_costs(assignments: list[AssignmentRecord]) -> list[dict[str, Any]]:
    """Per device tier (sorted by name), over the assignments that reported an upload: devices, and the largest
    slice (``params``), trained parameters, predicted training memory and measured peak memory (MiB)."""
    out: dict[str, dict[str, Any]] = {}
    for a in assignments:
        if not a.report:
            continue
        t = out.setdefault(a.tier, {"tier": a.tier, "devices": 0, "params": 0, "trained_params": 0,
                                    "predicted_memory_mb": 0.0, "peak_memory_mb": 0.0})
        t["devices"] += 1
        for key, source, value in (("params", a.predicted, "params"), ("trained_params", a.predicted, "trained_params"),
                                   ("predicted_memory_mb", a.predicted, "train_memory_mb"),
                                   ("peak_memory_mb", a.report, "peak_memory_mb")):
            t[key] = max(t[key], type(t[key])(_finite(source.get(value, 0) or 0)))
    return [out[k] for k in sorted(out)]


def observation(a: AssignmentRecord) -> Observation | None:
    """The calibration observation of an assignment's report (None when it has none or predates reports)."""
    if not a.report or not a.predicted:
        return None
    return observe(a.report, a.predicted, at=float(a.report.get("reported_at", a.created_at)))


def export(metrics: AggregatorMetrics, a: AssignmentRecord, obs: Observation) -> None:
    """Measured / predicted by tier and quantity, and the round time against the plan's estimate ("round")."""
    for quantity, ratio in ratios(obs).items():
        metrics.measured_ratio.labels(a.tier, quantity).observe(ratio)
    predicted = predicted_round_seconds(a)
    if predicted > 0 and a.report.get("round_seconds", 0) > 0:
        metrics.measured_ratio.labels(a.tier, "round").observe(a.report["round_seconds"] / predicted)


def predicted_round_seconds(a: AssignmentRecord) -> float:
    """The plan's round time: download + compute + upload estimated with the calibrated profile, plus the device's
    learned fixed cost of a round."""
    return float(a.predicted.get("est_seconds", 0) or 0) + float(a.predicted.get("calibration_overhead_s", 0) or 0)


def stored_observations(rounds: RoundStore, job_id: str) -> Iterator[tuple[str, Observation]]:
    """Every reported assignment of a job, oldest round first, as (device id, observation): a restarted aggregator
    rebuilds its calibrations from these."""
    for rnd in rounds.list_rounds(job_id):
        for a in rounds.assignments(rnd.round_id):
            obs = observation(a)
            if obs is not None:
                yield a.device_id, obs
