"""`raffm demo --data FILE`: a text file whose columns have other names than text,label is read by name, and the
files the demo writes for its fleet and its server are what the agent and the aggregator read by default."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from edge_agent.localdata import load_local_data
from raffm_app import demo


def _write(path: Path, n: int = 40) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "sentiment"])
        writer.writerows([f"review {i}", ("neg", "pos")[i % 2]] for i in range(n))
    return path


def test_named_columns_are_read_and_the_fleet_gets_text_and_label(tmp_path: Path) -> None:
    source = _write(tmp_path / "reviews.csv")
    settings = demo.DemoSettings(data=str(source), text_column="sentence", label_column="sentiment", test_size=10)
    data = demo.prepare_data(settings, tmp_path / "data")
    assert len(data.train) == 30 and len(data.test) == 10 and data.train.label_names == ("neg", "pos")
    fleet = load_local_data(str(data.train_path))  # what every agent of the demo reads, default columns
    assert fleet.texts == data.train.texts and fleet.labels == data.train.labels
    assert {t.split()[1] for t in fleet.texts} | {t.split()[1] for t in data.test.texts} == {str(i) for i in range(40)}


def test_unnamed_columns_are_refused_with_the_options_that_name_them(tmp_path: Path) -> None:
    settings = demo.DemoSettings(data=str(_write(tmp_path / "reviews.csv")), test_size=10)
    with pytest.raises(ValueError, match=r"has \['sentence', 'sentiment'\]; name the columns .* --text-column"):
        demo.prepare_data(settings, tmp_path / "data")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
