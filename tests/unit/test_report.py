"""raffm.report: the demo's report.md and plots, with and without the cuts matched to the full model and served."""

from __future__ import annotations

from pathlib import Path

from raffm.report import RoundRecord, RunReport, ScalingPoint, render_markdown, write_plots


def _report(matched: bool, served: bool = False) -> RunReport:
    report = RunReport("r", "raffm demo", "2026-12-04", {}, majority_rate=0.55, initial_accuracy=0.5)
    report.rounds = [RoundRecord(1, 0.7, 2, 2, 0, 10, 10, 40, 1.0)]
    report.scaling = [ScalingPoint(0.25, 0.6, 60, 0.61, "quarter", 0.25, 0.68 if matched else None,
                                   0.72 if served else None),
                      ScalingPoint(1.0, 1.0, 100, 0.7, "full", 1.0, 0.7 if matched else None, 0.74 if served else None)]
    return report


def test_the_scaling_table_has_a_matched_column_only_when_cuts_were_matched(tmp_path: Path) -> None:
    text = render_markdown(_report(True))
    assert "| test accuracy | matched | spec |" in text
    assert "| 25% | 25.0% | 60 | 60.0% | 61.0% | 68.0% | `quarter` |" in text
    plain = render_markdown(_report(False))
    assert "| matched |" not in plain and "| 25% | 25.0% | 60 | 60.0% | 61.0% | `quarter` |" in plain
    assert {p.name for p in write_plots(_report(True), tmp_path)} >= {"scaling.png"}


def test_served_cuts_and_rounds_get_their_own_column_and_line(tmp_path: Path) -> None:
    report = _report(True, served=True)
    report.rounds[0].served_accuracy = 0.75
    text = render_markdown(report)
    assert "| round | test accuracy | served | participants |" in text and "| 1 | 70.0% | 75.0% | 2/2 |" in text
    assert "| served | participants" not in render_markdown(_report(True, served=True))
    assert "| test accuracy | matched | served at the fleet's label prior | spec |" in text
    assert "| 25% | 25.0% | 60 | 60.0% | 61.0% | 68.0% | 72.0% | `quarter` |" in text
    assert "served at" not in render_markdown(_report(True))
    assert {p.name for p in write_plots(report, tmp_path)} >= {"accuracy.png", "scaling.png"}
