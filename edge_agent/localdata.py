"""The device's local training data, named by ``--data``.

- a CSV or JSON-lines file with a text and a label column (:func:`raffm.data.load_text_file`);
- a ``.pt`` (torch.save of a dict) or ``.npz`` file with ``images`` ``[N, C, H, W]`` floats in [0, 1] and
  ``labels`` ``[N]`` ints, for image models;
- a built-in offline set: ``rotten_tomatoes`` (text) or ``mnist`` (5,000 digits).

For a ``causal-lm`` job the data are prompt -> response pairs instead: a JSON-lines file of
``{"prompt": ..., "response": ...}`` objects (:func:`raffm.generative.load_instruction_file`) or ``rotten_tomatoes``
as instructions (:func:`raffm.generative.rotten_tomatoes_instructions`).
Bad or missing data raises ``ValueError`` naming the file; the agent reports it to the aggregator as a data failure.
"""

from __future__ import annotations

from pathlib import Path

from raffm.data import ImageDataset, TextDataset, load_image_file, load_text_file, mnist_5k, rotten_tomatoes
from raffm.generative import InstructionDataset, load_instruction_file, rotten_tomatoes_instructions

Dataset = TextDataset | ImageDataset | InstructionDataset
BUILTIN = ("rotten_tomatoes", "mnist")


def load_local_data(spec: str, *, text_column: str = "text", label_column: str = "label",
                    task: str = "sequence-classification") -> Dataset:
    if not spec:
        raise ValueError("no local data: pass --data with a CSV/JSON-lines file, an image array file, or a built-in "
                         f"set ({', '.join(BUILTIN)})")
    path = Path(spec).expanduser()
    if task == "causal-lm":
        if spec == "rotten_tomatoes":
            return rotten_tomatoes_instructions()
        if spec == "mnist" or path.suffix in (".pt", ".npz"):
            raise ValueError(f"--data {spec!r} is image data; a causal-lm job trains on prompt -> response pairs "
                             "(a JSON-lines file or rotten_tomatoes)")
        return load_instruction_file(path)
    if spec == "rotten_tomatoes":
        return rotten_tomatoes()
    if spec == "mnist":
        return mnist_5k()
    if path.suffix in (".pt", ".npz"):
        return load_image_file(path)
    return load_text_file(path, text_column=text_column, label_column=label_column)
