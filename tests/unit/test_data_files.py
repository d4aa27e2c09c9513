"""raffm.data.load_text_file: the CSV/TSV/JSON files devices, the demo and the aggregator read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from raffm.data import load_text_file, read_records


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows: list[dict], *, delimiter: str = ",", bom: bool = False) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
        writer = csv.DictWriter(f, list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


ROWS = [{"sentence": "a, b", "label": "pos"}, {"sentence": "c\nd", "label": "neg"}, {"sentence": "e", "label": "pos"}]


def test_label_names_and_integer_labels(tmp_path: Path) -> None:
    named = load_text_file(_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "sports"},
                                                         {"text": "y", "label": "world"},
                                                         {"text": "z", "label": "sports"}]))
    assert named.label_names == ("sports", "world") and named.labels == [0, 1, 0] and named.pairs is None
    numbered = load_text_file(_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 3}, {"text": "y", "label": 0}]))
    assert numbered.label_names == ("0", "1", "2", "3") and numbered.labels == [3, 0]
    other = load_text_file(_jsonl(tmp_path / "c.jsonl", [{"sentence": "x", "y": 1}]), text_column="sentence",
                           label_column="y")
    assert other.texts == ["x"] and other.labels == [1]


@pytest.mark.parametrize("name, write", [
    ("rows.csv", lambda p: _csv(p, ROWS)),
    ("rows.tsv", lambda p: _csv(p, ROWS, delimiter="\t")),
    ("rows.txt", lambda p: _csv(p, ROWS, delimiter=";")),
    ("excel.csv", lambda p: _csv(p, ROWS, bom=True)),  # a spreadsheet's byte-order mark before the header
    ("rows.jsonl", lambda p: _jsonl(p, ROWS)),
    ("array.json", lambda p: p.write_text(json.dumps(ROWS, indent=2))),
    ("hub.parquet", lambda p: _parquet(p, ROWS)),  # how data sets on the Hugging Face hub are published
])
def test_every_file_layout_reads_the_same_examples(tmp_path: Path, name: str, write) -> None:
    path = tmp_path / name
    write(path)
    data = load_text_file(path)  # columns found by name: "sentence" and "label"
    assert data.texts == ["a, b", "c\nd", "e"] and data.labels == [1, 0, 1] and data.label_names == ("neg", "pos")


@pytest.mark.parametrize("label", ["topic", "intent", "emotion", "polarity"])
def test_common_label_column_names_are_found(tmp_path: Path, label: str) -> None:
    """Topic, intent and emotion data sets name their label after what it is; a "label" column still comes first."""
    data = load_text_file(_jsonl(tmp_path / "t.jsonl", [{"content": "ball", label: "sports", "id": 7},
                                                        {"content": "chip", label: "tech", "id": 8}]))
    assert data.texts == ["ball", "chip"] and data.label_names == ("sports", "tech") and data.labels == [0, 1]
    both = load_text_file(_jsonl(tmp_path / "b.jsonl", [{"text": "x", label: "a", "label": 1}]))
    assert both.labels == [1]


@pytest.mark.parametrize("columns, named", [
    (("sentence1", "sentence2"), ""),
    (("premise", "hypothesis"), ""),
    (("text", "text_pair"), ""),
    (("left", "right"), "left, right"),
])
def test_sentence_pairs(tmp_path: Path, columns: tuple[str, str], named: str) -> None:
    first, second = columns
    path = _csv(tmp_path / "pairs.csv", [{first: "a", second: "b", "class": 1}, {first: "c", second: "d", "class": 0}])
    data = load_text_file(path, text_column=named)
    assert data.texts == ["a", "c"] and data.pairs == ["b", "d"] and data.labels == [1, 0]
    assert data.subset([1]).pairs == ["d"]


def test_the_jobs_label_names_number_every_devices_labels_alike(tmp_path: Path) -> None:
    """A device holding only some labels numbers them by the job's list, not by the names it happens to have."""
    job = ("negative", "neutral", "positive")
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": "positive"}, {"text": "y", "label": "negative"}])
    assert load_text_file(path).labels == [1, 0]  # alone, the file numbers its own two names
    data = load_text_file(path, label_names=job)
    assert data.labels == [2, 0] and data.label_names == job
    ids = load_text_file(_jsonl(tmp_path / "i.jsonl", [{"text": "x", "label": 2}]), label_names=job)
    assert ids.labels == [2]  # label ids are taken as they are
    with pytest.raises(ValueError, match=r"labels \['mixed'\] are not among the job's 3 labels"):
        load_text_file(_jsonl(tmp_path / "m.jsonl", [{"text": "x", "label": "mixed"}]), label_names=job)
    with pytest.raises(ValueError, match=r"labels \['3'\] are not among"):
        load_text_file(_jsonl(tmp_path / "o.jsonl", [{"text": "x", "label": 3}]), label_names=job)


@pytest.mark.parametrize("row, message", [
    ({"text": "x", "label": None}, "line 2 has no 'label'"),
    ({"text": "", "label": 1}, "line 2 has no 'text'"),
    ({"text": None, "label": ""}, "line 2 has no 'text' and no 'label'"),
    ({"review": "x", "label": 1}, r"line 2 lacks column 'text': it has \['label', 'review'\]; name the"),
    ({"text": "x", "label": -1}, "integer labels must be >= 0"),
    ({"text": "x", "label": ["a", "b"]}, "line 2: label .* is not one class; multi-label data is not supported"),
    (["x", 1], "line 2 is a JSON list; expected an object"),
])
def test_a_bad_row_is_named_with_what_to_do(tmp_path: Path, row: dict, message: str) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "fine", "label": 0}, row])
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        load_text_file(path)
    assert path.read_bytes() == before  # the user's file is never touched


@pytest.mark.parametrize("content, kwargs, message", [
    ('{"title": "x", "label": 1}\n', {}, r"line 1 has no text column of a known name: it has \['label', 'title'\]"),
    ('{"text": "x", "stars": 1}\n', {}, "line 1 has no label column of a known name"),
    ('{"text": "x", "label": 1}\n', {"text_column": "a,b,c"}, "name one column, or two"),
    ('[{"text": "x", "label": 1},\n', {}, r"is not valid JSON: .* \(line 2, column 1\)"),
    ('{"text": "x", "label": 1}\n{"text": \n', {}, "line 2 is not valid JSON"),
    ("", {}, "has no rows"),
])
def test_a_file_that_cannot_be_read_says_why(tmp_path: Path, content: str, kwargs: dict, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_text_file(path, **kwargs)


def test_a_damaged_parquet_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "cut.parquet"
    path.write_bytes(_parquet(tmp_path / "whole.parquet", ROWS).read_bytes()[:40])
    with pytest.raises(ValueError, match="cut.parquet is not a readable Parquet file"):
        read_records(path)


def test_a_file_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text .*; save it as UTF-8"):
        read_records(path)


def test_unlabelled_text_needs_only_its_text(tmp_path: Path) -> None:
    data = load_text_file(_jsonl(tmp_path / "u.jsonl", [{"text": "x"}, {"text": "y", "label": None}]),
                          label_column=None)
    assert data.texts == ["x", "y"] and data.label_names == ()


def test_whole_numbers_written_as_floats_are_ids_and_scores_are_refused(tmp_path: Path) -> None:
    """A spreadsheet or pandas writes the ids 0 and 1 as 0.0 and 1.0; a score such as 3.8 (STS-B) is no class."""
    ids = load_text_file(_csv(tmp_path / "f.csv", [{"text": "x", "label": "1.0"}, {"text": "y", "label": "0.0"}]))
    assert ids.labels == [1, 0] and ids.label_names == ("0", "1")
    with pytest.raises(ValueError, match=r"label '3.8' is a score, not a class .*bin the scores into classes"):
        load_text_file(_csv(tmp_path / "s.csv", [{"text": "x", "label": "4"}, {"text": "y", "label": "3.8"}]))
