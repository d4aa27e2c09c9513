"""The device's local training data, named by ``--data``.

- a CSV or JSON file of texts (or sentence pairs) with labels (:func:`raffm.data.load_text_file`);
- a ``.pt`` (torch.save of a dict) or ``.npz`` file with ``images`` ``[N, C, H, W]`` (bytes, or floats in [0, 1]) and
  ``labels`` ``[N]`` ints, or a folder of images in one subfolder per label, for image models (fitted to the
  model's input size once it is known: :meth:`raffm.data.ImageDataset.fitted`);
- a built-in offline set: ``rotten_tomatoes`` (text) or ``mnist`` (5,000 digits).

For a ``causal-lm`` job the data are prompt -> response pairs instead (:func:`raffm.generative.load_instructions`): a
CSV/JSON file of ``{"prompt": ..., "response": ...}`` records, ``rotten_tomatoes`` as sentiment instructions, or a
labelled text file whose every text is asked for its label's name.
Bad or missing data raises ``ValueError`` naming the file; the agent reports it to the aggregator as a data failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from raffm.data import (
    ImageDataset, TextDataset, load_image_file, load_image_folder, load_text_file, mnist_5k, rotten_tomatoes,
)
from raffm.generative import InstructionDataset, load_instructions

Dataset = TextDataset | ImageDataset | InstructionDataset
BUILTIN = ("rotten_tomatoes", "mnist")


def load_local_data(spec: str, *, text_column: str = "", label_column: str = "",
                    task: str = "sequence-classification", label_names: Sequence[str] = ()) -> Dataset:
    """``label_names``: the job's (named labels are numbered by them); the columns as
    :func:`raffm.data.load_text_file` takes them."""
    if not spec:
        raise ValueError("no local data: pass --data with a CSV/JSON file, an image array file or folder, or a "
                         f"built-in set ({', '.join(BUILTIN)})")
    if task == "causal-lm":
        return load_instructions(spec, text_column=text_column, label_column=label_column, label_names=label_names)
    path = Path(spec).expanduser()
    if spec == "rotten_tomatoes":
        return rotten_tomatoes()
    if spec == "mnist":
        return mnist_5k()
    if path.suffix in (".pt", ".npz"):
        return load_image_file(path)
    if path.is_dir():
        return load_image_folder(path, label_names=label_names)
    return load_text_file(path, text_column=text_column, label_column=label_column, label_names=label_names)
