"""raffm.data.load_text_file: the CSV/JSON-lines files devices, the demo and the aggregator read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raffm.data import load_text_file


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_names_and_integer_labels(tmp_path: Path) -> None:
    named = load_text_file(_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "sports"},
                                                         {"text": "y", "label": "world"},
                                                         {"text": "z", "label": "sports"}]))
    assert named.label_names == ("sports", "world") and named.labels == [0, 1, 0]
    numbered = load_text_file(_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 3}, {"text": "y", "label": 0}]))
    assert numbered.label_names == ("0", "1", "2", "3") and numbered.labels == [3, 0]
    other = load_text_file(_jsonl(tmp_path / "c.jsonl", [{"sentence": "x", "y": 1}]), text_column="sentence",
                           label_column="y")
    assert other.texts == ["x"] and other.labels == [1]


@pytest.mark.parametrize("row, message", [
    ({"text": "x", "label": None}, "row 2 has no 'label'"),
    ({"text": "", "label": 1}, "row 2 has no 'text'"),
    ({"text": None, "label": ""}, "row 2 has no 'text' and no 'label'"),
    ({"review": "x", "label": 1}, r"row 2 lacks column 'text' or 'label': has \['label', 'review'\]; name the"),
    ({"text": "x", "label": -1}, "integer labels must be >= 0"),
])
def test_a_bad_row_is_named_with_what_to_do(tmp_path: Path, row: dict, message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": 0}, row])
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        load_text_file(path)
    assert path.read_bytes() == before  # the user's file is never touched


def test_unlabelled_text_needs_only_its_text(tmp_path: Path) -> None:
    data = load_text_file(_jsonl(tmp_path / "u.jsonl", [{"text": "x"}, {"text": "y", "label": None}]),
                          label_column=None)
    assert data.texts == ["x", "y"] and data.label_names == ()
