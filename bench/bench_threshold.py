"""A demo run's saved versions scored with the decision threshold matched to the fleet's label prior (issue 10).

The devices train with logit adjustment (the strategy's ``prior_correction``), so the merged model is fit for a
balanced label distribution, and from round to round its share of each predicted label swings (on the default demo,
seed 1: 77 -> 38 -> 14 -> 49% "fresh" where 58% are). This tool asks what serving each version with per-label logit
offsets would give, offsets chosen so that on unlabelled reviews the model predicts each label as often as the fleet
holds it: no label of the test split is read to choose them. The prior is the label shares of the fleet's data, as
its devices reported them (the rounds' ``label_counts`` in ``report.json``; for runs from before devices reported
them, the run's ``data/train.jsonl``, which the demo dealt out), the unlabelled inputs the first ``--pool`` reviews
of that file.

    .venv/bin/python bench/bench_threshold.py runs/<id> [runs/<id2> ...] [--json out.json]

Reads only; a table per run, then the mean ± std over the runs per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score_run(run: Path, pool_size: int) -> list[dict[str, float | str]]:
    """Each version of ``run``'s checkpoint store as the demo scored it and with its threshold fitted to the prior."""
    from transformers import AutoTokenizer

    from raffm.checkpoints import checkpoint_store_from_url
    from raffm.data import load_text_file
    from raffm.models import model_from_state, resolve_model
    from raffm.threshold import fit_threshold, label_counts
    from raffm.training import evaluate

    report = json.loads((run / "report.json").read_text())
    settings = report["settings"]
    names, seq_len = tuple(settings["labels"]), settings["seq_len"]
    train = load_text_file(run / "data" / "train.jsonl", label_names=names)
    test = load_text_file(run / "data" / "test.jsonl", label_names=names)
    # what the devices reported of their data, as the demo serves it (runs from before they reported: their data)
    counts = label_counts(r.get("label_counts", []) for r in report["rounds"]) or \
        torch.bincount(torch.tensor(train.labels), minlength=len(names)).tolist()
    prior = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    pool = train.subset(range(min(pool_size, len(train))))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(settings["model"]))
    store = checkpoint_store_from_url(str(run / "checkpoints"))
    rows: list[dict[str, float | str]] = []
    for info in store.versions():
        model = model_from_state(info.config, store.load(info.version), task="sequence-classification")
        accuracy = evaluate(model, test, tokenizer, seq_len=seq_len)
        fit_threshold(model, pool, tokenizer, prior, seq_len=seq_len)
        rows.append({"version": info.version, "accuracy": accuracy,
                     "prior_matched": evaluate(model, test, tokenizer, seq_len=seq_len)})
        print(f"{run.name} {info.version}: accuracy {accuracy:.4f}, threshold at the fleet's prior "
              f"{rows[-1]['prior_matched']:.4f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="demo run directories (`raffm demo --out DIR`)")
    parser.add_argument("--pool", type=int, default=1000, help="unlabelled reviews the offsets are chosen on")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
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
