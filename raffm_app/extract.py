"""`raffm extract` and `raffm inspect`: cut a sub-model to a budget or a spec, and describe a saved one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from raffm_app.cli import wire_dtype_arg


def register(subparsers: Any) -> None:
    extract = subparsers.add_parser(
        "extract",
        help="cut a salience-ordered sub-model that fits a memory budget (or a given spec) into an HF model folder",
        description=(
            "Load a global model, apply salient parameter prioritization, pick the largest sub-model whose predicted "
            "peak training memory fits --memory-mb with the strategy's recipe (or take --spec), and save it as a "
            "Hugging Face model folder (loadable with AutoModel.from_pretrained after `import raffm.elastic`), plus "
            "spec.json, recipe.json (how the device trains it) and costs.json."
        ),
    )
    extract.add_argument("--model", default="minilm", help="HF model id or local folder, minilm or smollm2 (the shipped models; "
                         "default: minilm)")
    extract.add_argument("--out", required=True, type=Path, help="output folder (created)")
    budget = extract.add_mutually_exclusive_group(required=True)
    budget.add_argument("--memory-mb", type=float, help="training memory budget of the target device, MiB")
    budget.add_argument("--spec", type=Path, help="an ElasticSpec JSON file (as written by `raffm extract`)")
    extract.add_argument("--batch-size", type=int, default=16, help="training batch size the budget is for (16)")
    extract.add_argument("--seq-len", type=int, default=64,
                         help="training sequence length the budget is for (64; a ViT's is its patches + 1)")
    extract.add_argument("--task", choices=("sequence-classification", "image-classification", "causal-lm"),
                         help="the task head to cut with (default: the model's own: images for a ViT, generation for "
                              "a decoder LLM, else text classification)")
    extract.add_argument("--num-labels", type=int, default=2, help="outputs of the task head (2)")
    extract.add_argument("--strategy", default="raffm", help="the method whose recipe the budget is priced with: "
                         "raffm (frozen embeddings and first layer, checkpointing when needed), fedavg, paper, "
                         "heterofl")
    extract.add_argument("--wire-dtype", default="float32", type=wire_dtype_arg, metavar="DTYPE",
                         help="float32, float16 or bfloat16 (fp32/fp16/bf16 too), for the byte count (float32)")
    extract.add_argument("--match", metavar="DATA",
                         help="unlabelled inputs (a CSV/TSV/JSON/Parquet text file, a .pt/.npz image file, a folder of "
                              "images, rotten_tomatoes or mnist; labels, if any, are not read): refit the cut, layer "
                              "by layer, to compute what the full model computes on them, which wins back most of "
                              "what a small cut loses (least squares on the projections around its heads and neurons; "
                              "for MiniLM and 1,000 inputs 20-35 s on 2 cores, not retraining; classifiers)")
    extract.add_argument("--match-samples", type=int, default=1000, metavar="N",
                         help="inputs of --match used, the first N (1000)")
    extract.add_argument("--label-prior", metavar="P,P,...",
                         help="the share (or count) of each label where the cut will serve, in label order, e.g. "
                              "the fleet's: fold into its output bias the threshold that makes it predict each label "
                              "that often on the --match inputs, and write it to threshold.json (devices train for "
                              "balanced labels, so a merged model's own threshold serves no data in particular)")
    extract.set_defaults(func=run_extract)

    inspect = subparsers.add_parser(
        "inspect",
        help="print the spec and predicted costs of a sub-model folder",
        description="Print the elastic spec a sub-model folder carries in its config, and its predicted costs with "
                    "the recipe it was cut for (its recipe.json).",
    )
    inspect.add_argument("folder", type=Path, help="a folder written by `raffm extract`")
    inspect.add_argument("--batch-size", type=int, default=16)
    inspect.add_argument("--seq-len", type=int, default=64)
    inspect.set_defaults(func=run_inspect)


def run_extract(args: argparse.Namespace) -> int:
    from raffm.costs import CostModel
    from raffm.elastic import extract
    from raffm.fitting import RoundBudget
    from raffm.models import load_config, load_global_model, resolve_model
    from raffm.planning import default_task
    from raffm.spec import ElasticSpec
    from raffm.spp import prioritize
    from raffm.strategy import strategy_named
    from raffm.threshold import fit_threshold, parse_prior

    strategy = strategy_named(args.strategy)
    task = args.task or default_task(load_config(args.model).model_type)
    prior = None
    if args.label_prior is not None:
        if not args.match:
            raise ValueError("--label-prior fits the threshold on unlabelled inputs: give them with --match")
        prior = parse_prior(args.label_prior, args.num_labels)
    model = prioritize(load_global_model(args.model, task=task, num_labels=args.num_labels))
    costs_of = CostModel.from_model(model)
    seq_len = costs_of.image_tokens or args.seq_len
    if args.spec is not None:
        spec = ElasticSpec.from_json(args.spec.read_text()).validate(costs_of.dims)
        recipe = strategy.recipe_for(spec, costs_of)
    else:
        # Unbounded compute, links and deadline: `raffm extract --memory-mb` fits memory only.
        profile = RoundBudget(
            train_memory_mb=args.memory_mb, gflops=1e7, up_mbps=1e6, down_mbps=1e6, deadline_s=7 * 86400,
            batch_size=args.batch_size, seq_len=seq_len,
        )
        planned = strategy.plan(costs_of, profile, wire_dtype=args.wire_dtype)
        spec, recipe = planned.spec, planned.recipe
    costs = costs_of.estimate(spec, batch_size=args.batch_size, seq_len=seq_len, wire_dtype=args.wire_dtype,
                              recipe=recipe)
    sub = extract(model, spec)
    threshold = None
    if args.match:
        data, tokenizer = _match(sub, model, args, task, seq_len)
        if prior is not None:
            offsets = fit_threshold(sub, data, tokenizer, prior, seq_len=seq_len, max_examples=len(data))
            threshold = {"label_prior": prior.tolist(), "offsets": offsets.tolist(), "inputs": len(data)}
            print(f"serving threshold fitted to the label prior {args.label_prior} on {len(data)} inputs: output "
                  f"bias moved by {', '.join(f'{o:+.3f}' for o in offsets.tolist())}")
    args.out.mkdir(parents=True, exist_ok=True)
    sub.save_pretrained(args.out)
    _copy_tokenizer(resolve_model(args.model), args.out)
    (args.out / "spec.json").write_text(spec.to_json() + "\n")
    (args.out / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    (args.out / "costs.json").write_text(json.dumps(costs.to_dict(), indent=2) + "\n")
    if threshold is not None:
        (args.out / "threshold.json").write_text(json.dumps(threshold, indent=2) + "\n")
    full = costs_of.params(ElasticSpec.full(costs_of.dims))
    print(f"wrote {args.out}: {costs.params:,} parameters ({costs.params / full:.0%} of {full:,})")
    print(_describe(spec, costs))
    return 0


def _match(sub: Any, model: Any, args: argparse.Namespace, task: str, seq_len: int) -> tuple[Any, Any]:
    """Refit ``sub`` to ``model`` on the unlabelled ``--match`` data (in place); returns the data and tokenizer."""
    from raffm.data import ImageDataset, load_unlabelled
    from raffm.models import resolve_model
    from raffm.scaling import MATCH_MIN_EXAMPLES, CutMatcher, fidelity

    if task == "causal-lm":
        raise ValueError("--match scores the cut by its predicted class; it takes classifiers (text or images)")
    if args.match_samples < MATCH_MIN_EXAMPLES:
        raise ValueError(f"--match-samples is {args.match_samples}; matching a cut needs at least "
                         f"{MATCH_MIN_EXAMPLES} inputs")
    data = load_unlabelled(args.match)
    data = data.subset(range(min(len(data), args.match_samples)))
    tokenizer = None
    if isinstance(data, ImageDataset):
        data = data.fitted(model.config)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))

    def agreement() -> float:
        return fidelity(model, sub, data, tokenizer, seq_len=seq_len, max_examples=len(data))["prediction_agreement"]

    before = agreement()
    CutMatcher(model, data, tokenizer, seq_len=seq_len, max_examples=len(data))(sub)
    print(f"matched on {len(data)} unlabelled inputs of {args.match}: the cut predicts what the full model "
          f"predicts for {before:.0%} of them before, {agreement():.0%} after")
    return data, tokenizer


def run_inspect(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig

    import raffm.elastic  # noqa: F401  (registers the elastic config classes)
    from raffm.costs import CostModel
    from raffm.elastic import ELASTIC_CLASSES
    from raffm.recipe import Recipe
    from raffm.spec import ElasticSpec

    if not (args.folder / "config.json").is_file():
        raise ValueError(f"{args.folder} has no config.json; pass a folder written by `raffm extract`")
    config = AutoConfig.from_pretrained(args.folder)
    if getattr(config, "raffm_spec", None) is None:
        raise ValueError(f"{args.folder} is not a RaFFM sub-model (its config has no raffm_spec); make one with `raffm extract`")
    spec = ElasticSpec.from_dict(config.raffm_spec)
    stock = next(s for s, e in ELASTIC_CLASSES.items() if e.__name__ in (config.architectures or []))
    global_config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "raffm_spec"})
    with torch.device("meta"):  # shapes only, no weights
        global_model = stock(global_config)
    cost_model = CostModel.from_model(global_model)  # a tied LM head counted once; the config's dropout
    recipe_file = args.folder / "recipe.json"  # how the device trains it, as `raffm extract` priced it
    recipe = Recipe.from_dict(json.loads(recipe_file.read_text())) if recipe_file.is_file() else None
    costs = cost_model.estimate(spec, batch_size=args.batch_size, seq_len=cost_model.image_tokens or args.seq_len,
                                recipe=recipe)
    print(f"{args.folder}: {stock.__name__} sub-model")
    print(_describe(spec, costs))
    return 0


def _describe(spec: Any, costs: Any) -> str:
    layers = "\n".join(
        f"  layer {i}: {l.heads} heads x {l.head_dim} dims, ffn {l.ffn}" for i, l in enumerate(spec.layers)
    )
    return (
        f"spec: hidden {spec.hidden}, {spec.depth} layers\n{layers}\n"
        f"costs at batch {costs.batch_size} x seq {costs.seq_len}: {costs.params:,} parameters, "
        f"{costs.wire_bytes / 2**20:.1f} MiB on the wire ({costs.wire_dtype}), "
        f"{costs.flops_per_sample / 1e9:.2f} GFLOP per training sample, "
        f"peak training memory {costs.train_memory_mb:.0f} MiB "
        f"(weights {costs.weights_mb:.0f}, gradients {costs.gradients_mb:.0f}, AdamW {costs.optimizer_mb:.0f}, "
        f"activations {costs.activations_mb:.0f}, overhead {costs.overhead_mb:.0f})"
    )


def _copy_tokenizer(source: str, out: Path) -> None:
    """Ship the tokenizer with the sub-model so it runs with the HF tokenizer out of the box (text models only)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # vision models have no tokenizer
        return
    tokenizer.save_pretrained(out)
