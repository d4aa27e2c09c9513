"""A toy text task that a tiny random-init BERT learns in seconds, shared by the bench smoke and learning tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification

from raffm.data import TextDataset

GOOD = ["great fun", "lovely warm film", "a joy", "moving and bright", "superb cast"]
BAD = ["dull mess", "boring and long", "a chore", "flat and tired", "weak plot"]


class WordHashTokenizer:
    """Enough of an HF tokenizer for ``raffm.training.batches``: words hashed into a small vocabulary."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, texts: list[str], *, max_length: int, **_: Any) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, text in enumerate(texts):
            words = [1] + [2 + sum(map(ord, w)) % (self.vocab - 2) for w in text.split()][: max_length - 1]
            ids[i, : len(words)] = torch.tensor(words)
            mask[i, : len(words)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_model(seed: int, **overrides: Any) -> BertForSequenceClassification:
    """Wide FFN and many heads against a small vocabulary: the layers, which slicing cuts, dominate the memory."""
    torch.manual_seed(seed)
    values: dict[str, Any] = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                  intermediate_size=512, max_position_embeddings=32, num_labels=2)
    values.update(overrides)
    return BertForSequenceClassification(BertConfig(**values)).eval()


def toy_data(n: int = 160, seed: int = 0) -> TextDataset:
    """Reviews that say good or bad things, with distracting words; label 1 = good."""
    gen = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = int(torch.randint(0, 2, (1,), generator=gen))
        phrase = (GOOD if label else BAD)[int(torch.randint(0, 5, (1,), generator=gen))]
        texts.append(f"the film was {phrase} take {i % 7}")
        labels.append(label)
    return TextDataset(texts, labels, ("rotten", "fresh"))
