"""Does the edge agent stay within its declared ``--memory-mb``? Predicted vs measured, MiniLM, batch 16 x 64 tokens.

For each budget the RaFFM strategy (:meth:`raffm.strategy.Strategy.plan`, with ``--strategy-options``) picks the spec
and its recipe (frozen vocabulary at half precision, nested cuts if asked for, activation checkpointing when needed),
as the aggregator does. A fresh
subprocess per budget then runs exactly the agent's local round (:func:`edge_agent.trainer.run_local_round`:
received tensors -> spill -> sub-model -> the recipe's steps on Rotten Tomatoes reviews, four to a row so that every
batch fills its tokens -> delta) and measures the peak RSS
growth from *before the downloaded tensors exist* to the end of training, after a warm-up step of a tiny model
(interpreter, torch and tokenizer runtime are the process's fixed cost, not the model's). Exit status 1 if any
measured peak exceeds its budget.

    python bench/bench_agent_memory.py [--budgets 150 250 400 1500] [--steps 3] [--threads 2]
        [--strategy-options '{"nested_fractions": [0.25, 0.5, 0.75]}']
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def child(budget: int, steps: int, batch: int, seq: int, options: dict[str, object]) -> dict[str, object]:
    import gc

    import torch

    from raffm.memory import configure_allocator

    configure_allocator()
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from edge_agent.trainer import MemoryMeter, predict_memory, run_local_round
    from raffm.costs import CostModel
    from raffm.data import TextDataset, rotten_tomatoes
    from raffm.elastic import extract
    from raffm.fitting import RoundBudget
    from raffm.models import default_model_path, load_global_model
    from raffm.strategy import STRATEGIES
    from raffm.training import LocalConfig, train_local

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    # Batches are padded to their longest text only, so the prediction (full-length batches) is a bound that short
    # reviews stay under: rows of four reviews each fill all ``seq`` tokens, the case the budget must hold for.
    reviews = rotten_tomatoes()
    rows = range(batch * steps)
    data = TextDataset([" ".join(reviews.texts[4 * i : 4 * i + 4]) for i in rows],
                       [reviews.labels[4 * i] for i in rows], reviews.label_names)
    local = LocalConfig(batch_size=batch, seq_len=seq, local_steps=steps, lr=5e-5)

    with tempfile.TemporaryDirectory() as tmp:
        received = Path(tmp) / "received.pt"
        # What the servers do: plan the spec and recipe for the budget, cut the slice. Then forget the global model.
        global_model = load_global_model()
        config = global_model.config
        fitted = STRATEGIES["raffm"].with_options(**options).plan(
            CostModel.from_model(global_model),
            RoundBudget(train_memory_mb=budget, gflops=1e4, up_mbps=1e4, down_mbps=1e4, deadline_s=86400.0,
                        batch_size=batch, seq_len=seq, local_steps=steps))
        sub = extract(global_model, fitted.spec)
        torch.save({n: p.detach().clone() for n, p in sub.named_parameters()}, received)
        del global_model, sub
        gc.collect()

        # Warm-up: one step of a tiny model through the same code, so lazy runtime init is not charged to the model.
        tiny = BertForSequenceClassification(BertConfig(vocab_size=config.vocab_size, hidden_size=16,
                                                        num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=32))  # 2 labels: the default
        train_local(tiny, data, tokenizer, LocalConfig(batch_size=batch, seq_len=seq, local_steps=1))
        del tiny
        gc.collect()

        prediction = predict_memory(config, fitted.spec, batch_size=batch, seq_len=seq, fedprox=False, image=False,
                                    recipe=fitted.recipe)
        meter = MemoryMeter()
        meter.start()
        tensors = torch.load(received, map_location="cpu", weights_only=True)  # the download arriving
        result = run_local_round(tensors, global_config=config, spec=fitted.spec, data=data, tokenizer=tokenizer,
                                 local=local, spill_path=Path(tmp) / "spill.pt", meter=meter, recipe=fitted.recipe)
        return {
            "budget_mb": budget,
            "spec": fitted.spec.key(),
            "nested": len(fitted.recipe.nested),
            "checkpointing": fitted.recipe.checkpointing,
            "params": fitted.costs.params,
            "fitter_predicted_mb": round(fitted.costs.train_memory_mb, 1),
            "agent_predicted_mb": round(prediction.total_mb, 1),
            "measured_mb": round(meter.peak_mb, 1),
            "steps": result.steps,
            "loss": round(result.loss, 4),
        }


def run(budgets: list[int], steps: int, batch: int, seq: int, threads: int | None,
        options: dict[str, object] | None = None) -> list[dict[str, object]]:
    rows = []
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for budget in budgets:
        cmd = [sys.executable, __file__, "--child", str(budget), "--steps", str(steps), "--batch-size", str(batch),
               "--seq-len", str(seq), "--strategy-options", json.dumps(options or {})]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"budget {budget}: measurement failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[150, 250, 400, 1500], help="--memory-mb values")
    parser.add_argument("--steps", type=int, default=3, help="training steps per measurement (>= 2: AdamW state)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="OMP threads in the measuring process (0: default)")
    parser.add_argument("--strategy-options", type=json.loads, default={},
                        help="RaFFM strategy settings as JSON, e.g. '{\"nested_fractions\": [0.25, 0.5, 0.75]}'")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.seq_len, args.strategy_options)))
        return 0
    rows = run(args.budgets, args.steps, args.batch_size, args.seq_len, args.threads or None, args.strategy_options)
    print(f"edge agent local round, MiniLM, batch {args.batch_size} x {args.seq_len} tokens, {args.steps} AdamW steps")
    print(f"{'budget':>7} {'spec':<22} {'params':>10} {'fitter':>8} {'agent':>8} {'measured':>9} {'meas/budget':>12}")
    ok = True
    for r in rows:
        ratio = float(r["measured_mb"]) / float(r["budget_mb"])  # type: ignore[arg-type]
        ok &= ratio <= 1.0
        spec = str(r["spec"])
        spec = spec if len(spec) <= 22 else spec[:19] + "..."
        print(f"{r['budget_mb']:>5}MB {spec:<22} {r['params']:>10,} {r['fitter_predicted_mb']:>6}MB "
              f"{r['agent_predicted_mb']:>6}MB {r['measured_mb']:>7}MB {ratio:>12.2f}")
    print("all within budget" if ok else "OVER BUDGET")
    print(json.dumps(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
