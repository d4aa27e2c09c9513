"""A demo run's saved versions scored with the decision threshold matched to the fleet's label prior (issue 10).

The devices train with logit adjustment (the strategy's ``prior_correction``), so the merged model is fit for a
balanced label distribution, and from round to round its share of each predicted label swings (on the default demo,
seed 1: 77 -> 38 -> 14 -> 49% "fresh" where 58% are). This tool asks what serving each version with per-label logit
offsets would give, offsets chosen so that on unlabelled reviews the model predicts each label as often as the fleet
holds it: no label of the test split is read to choose them. The prior is the label shares of the fleet's data (the
run's ``data/train.jsonl``, which the demo dealt out: a figure devices could report with their sample counts), the
unlabelled inputs the first ``--pool`` reviews of it (the demo matches its cuts on the same ones).

    .venv/bin/python bench/bench_threshold.py runs/<id> [runs/<id2> ...] [--json out.json]

Reads only; a table per run, then the mean ± std over the runs per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prior_offsets(logits: torch.Tensor, prior: torch.Tensor, iterations: int = 500) -> torch.Tensor:
    """Per-label offsets (K,) that make ``(logits + offsets).argmax(-1)`` over the N inputs of ``logits`` (N, K)
    pick each label about as often as ``prior`` (K,) says. They minimise the convex mean_i max_k (logits_ik + b_k)
    - prior . b, whose subgradient is (share of each label - prior): subgradient steps shrinking as 1/sqrt(t),
    scaled to the logits' spread; the offsets whose shares came closest are kept."""
    offsets = torch.zeros(logits.shape[1])
    best, best_gap = offsets.clone(), float("inf")
    scale = float(logits.std()) or 1.0
    for t in range(1, iterations + 1):
        share = torch.bincount((logits + offsets).argmax(-1), minlength=logits.shape[1]).float() / len(logits)
        gap = float((share - prior).abs().sum())
        if gap < best_gap:
            best, best_gap = offsets.clone(), gap
        offsets -= scale / t**0.5 * (share - prior)
    return best - best.mean()


@torch.no_grad()
def all_logits(model: torch.nn.Module, data: Any, tokenizer: Any, seq_len: int) -> torch.Tensor:
    from raffm.training import batches

    out = [model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
           for b in batches(data, tokenizer, 64, seq_len, shuffle=False)]
    return torch.cat(out)


def score_run(run: Path, pool_size: int) -> list[dict[str, float | str]]:
    from transformers import AutoTokenizer

    from raffm.checkpoints import checkpoint_store_from_url
    from raffm.data import load_text_file
    from raffm.models import model_from_state, resolve_model

    report = json.loads((run / "report.json").read_text())
    settings = report["settings"]
    names = tuple(settings["labels"])
    train = load_text_file(run / "data" / "train.jsonl", label_names=names)
    test = load_text_file(run / "data" / "test.jsonl", label_names=names)
    prior = torch.bincount(torch.tensor(train.labels), minlength=len(names)).float() / len(train)
    pool = train.subset(range(min(pool_size, len(train))))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings["model"]))
    store = checkpoint_store_from_url(str(run / "checkpoints"))
    labels = torch.tensor(test.labels)
    rows: list[dict[str, float | str]] = []
    for info in store.versions():
        model = model_from_state(info.config, store.load(info.version), task="sequence-classification")
        on_test = all_logits(model, test, tokenizer, settings["seq_len"])
        offsets = prior_offsets(all_logits(model, pool, tokenizer, settings["seq_len"]), prior)
        shares = torch.bincount(on_test.argmax(-1), minlength=len(names)).float() / len(test)
        rows.append({"version": info.version,
                     "accuracy": (on_test.argmax(-1) == labels).float().mean().item(),
                     "prior_matched": ((on_test + offsets).argmax(-1) == labels).float().mean().item(),
                     "predicted_share": shares.tolist()[-1], "prior": prior.tolist()[-1]})
        print(f"{run.name} {info.version}: accuracy {rows[-1]['accuracy']:.4f}, prior-matched threshold "
              f"{rows[-1]['prior_matched']:.4f} (predicted share of {names[-1]!r} {shares[-1]:.2f}, fleet's "
              f"{prior[-1]:.2f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo run directories (`raffm demo --out DIR`)")
    parser.add_argument("--pool", type=int, default=1000, help="unlabelled reviews the offsets are chosen on")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {str(run): score_run(run, args.pool) for run in args.runs}
    rounds = min(len(rows) for rows in results.values())
    print("\n| version | accuracy, mean ± std | prior-matched threshold, mean ± std | per run |\n|---|---|---|---|")
    for i in range(rounds):
        raw = [float(rows[i]["accuracy"]) * 100 for rows in results.values()]
        matched = [float(rows[i]["prior_matched"]) * 100 for rows in results.values()]
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        print(f"| {i} | {statistics.fmean(raw):.1f} ± {spread(raw):.1f} | {statistics.fmean(matched):.1f} ± "
              f"{spread(matched):.1f} | {', '.join(f'{a:.1f} -> {b:.1f}' for a, b in zip(raw, matched))} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
