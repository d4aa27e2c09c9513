"""Do sentence pairs reach the model as pairs? A claim check on the shipped Rotten Tomatoes reviews.

Each example is (review, claim) with the claim "the critic liked it" or "the critic disliked it" drawn at random;
the label says whether the claim matches the review. The review alone says nothing about the label (the claim is a
coin flip), so a model that reads only the first text stays at chance and one that reads both can learn. Both are
trained the same way (:func:`raffm.training.train_local` on the shipped MiniLM, one device, no federation) from the
same seed, and scored on the same held-out examples: the pair as the data path tokenizes it (two segments), and the
review alone.

    python bench/bench_pairs.py [--seeds 0,1,2,3] [--steps 250] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from raffm.data import TextDataset

CLAIMS = ("the critic disliked it", "the critic liked it")


def claim_check(seed: int, examples: int) -> tuple[TextDataset, TextDataset]:
    """(train, test) pair data sets, 5:1."""
    from raffm.data import TextDataset, rotten_tomatoes

    rng = random.Random(seed)
    reviews = rotten_tomatoes()
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int] = []
    for i in rng.sample(range(len(reviews)), examples):
        claim = rng.randrange(2)
        texts.append(reviews.texts[i])
        pairs.append(CLAIMS[claim])
        labels.append(int(claim == reviews.labels[i]))
    data = TextDataset(texts, labels, ("no", "yes"), pairs)
    cut = examples * 5 // 6
    return data.subset(range(cut)), data.subset(range(cut, examples))


def run(seed: int, steps: int, examples: int) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer

    from raffm.data import TextDataset
    from raffm.models import default_model_path, load_global_model
    from raffm.training import LocalConfig, evaluate, train_local

    train, test = claim_check(seed, examples)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    out = {"majority": max(sum(test.labels), len(test) - sum(test.labels)) / len(test)}
    for name, keep_pairs in (("pairs", True), ("first text only", False)):
        def view(d: TextDataset) -> TextDataset:
            return d if keep_pairs else TextDataset(d.texts, d.labels, d.label_names)

        torch.manual_seed(seed)
        model = load_global_model(default_model_path(), num_labels=2)
        train_local(model, view(train), tokenizer, LocalConfig(batch_size=16, seq_len=64, lr=5e-5, local_steps=steps,
                                                               seed=seed))
        out[name] = evaluate(model, view(test), tokenizer, seq_len=64)
        print(f"seed {seed} {name}: test accuracy {out[name]:.3f} (majority {out['majority']:.3f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=250, help="training steps of batch 16 (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=2400, help="examples, 5/6 trained (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runs = [run(int(s), args.steps, args.examples) for s in args.seeds.split(",")]
    for name in ("pairs", "first text only", "majority"):
        values = [r[name] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name}: {statistics.mean(values):.3f} ± {spread:.3f} over {len(values)} seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
