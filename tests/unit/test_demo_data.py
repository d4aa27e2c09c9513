"""`raffm demo --data FILE`: a text file's columns are found by their names or named by the user, sentence pairs
stay pairs, and the files the demo writes for its fleet and its server are what the agent and the aggregator read by
default."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from edge_agent.localdata import load_local_data
from raffm_app import demo


def _write(path: Path, n: int = 40, columns: tuple[str, str] = ("title", "verdict")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([f"review {i}", ("neg", "pos")[i % 2]] for i in range(n))
    return path


def test_named_columns_are_read_and_the_fleet_gets_text_and_label(tmp_path: Path) -> None:
    source = _write(tmp_path / "reviews.csv")
    settings = demo.DemoSettings(data=str(source), text_column="title", label_column="verdict", test_size=10)
    data = demo.prepare_data(settings, tmp_path / "data")
    assert len(data.train) == 30 and len(data.test) == 10 and data.train.label_names == ("neg", "pos")
    fleet = load_local_data(str(data.train_path))  # what every agent of the demo reads, default columns
    assert fleet.texts == data.train.texts and fleet.labels == data.train.labels
    assert {t.split()[1] for t in fleet.texts} | {t.split()[1] for t in data.test.texts} == {str(i) for i in range(40)}


def test_known_column_names_are_found_and_others_refused_with_the_options_that_name_them(tmp_path: Path) -> None:
    assert demo.prepare_data(demo.DemoSettings(data=str(_write(tmp_path / "known.csv", columns=("review", "class"))),
                                               test_size=10), tmp_path / "known").train.label_names == ("neg", "pos")
    settings = demo.DemoSettings(data=str(_write(tmp_path / "reviews.csv")), test_size=10)
    with pytest.raises(ValueError, match=r"has \['title', 'verdict'\]; name the columns .* --text-column"):
        demo.prepare_data(settings, tmp_path / "data")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_sentence_pairs_reach_the_fleet_as_pairs(tmp_path: Path) -> None:
    source = tmp_path / "nli.csv"
    with source.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["premise", "hypothesis", "label"])
        writer.writerows([f"premise {i}", f"hypothesis {i}", ("entailment", "contradiction")[i % 2]] for i in range(30))
    data = demo.prepare_data(demo.DemoSettings(data=str(source), test_size=10), tmp_path / "data")
    fleet = load_local_data(str(data.train_path))
    assert fleet.pairs == data.train.pairs and fleet.texts == data.train.texts and fleet.labels == data.train.labels
    assert all(p.replace("hypothesis", "premise") == t for t, p in zip(fleet.texts, fleet.pairs or []))
