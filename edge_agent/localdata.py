"""The device's local training data, named by ``--data``.

- a CSV or JSON-lines file with a text and a label column (:func:`raffm.data.load_text_file`);
- a ``.pt`` (torch.save of a dict) or ``.npz`` file with ``images`` ``[N, C, H, W]`` floats in [0, 1] and
  ``labels`` ``[N]`` ints, for image models;
- a built-in offline set: ``rotten_tomatoes`` (text) or ``mnist`` (5,000 digits).
Bad or missing data raises ``ValueError`` naming the file; the agent reports it to the aggregator as a data failure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raffm.data import ImageDataset, TextDataset, load_text_file, mnist_5k, rotten_tomatoes

Dataset = TextDataset | ImageDataset
BUILTIN = ("rotten_tomatoes", "mnist")


def load_local_data(spec: str, *, text_column: str = "text", label_column: str = "label") -> Dataset:
    if not spec:
        raise ValueError("no local data: pass --data with a CSV/JSON-lines file, an image array file, or a built-in "
                         f"set ({', '.join(BUILTIN)})")
    if spec == "rotten_tomatoes":
        return rotten_tomatoes()
    if spec == "mnist":
        return mnist_5k()
    path = Path(spec).expanduser()
    if path.suffix in (".pt", ".npz"):
        return _load_images(path)
    return load_text_file(path, text_column=text_column, label_column=label_column)


def _load_images(path: Path) -> ImageDataset:
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
