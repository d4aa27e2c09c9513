"""`raffm extract` / `raffm inspect` on the real shipped MiniLM, through the console entry point."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import raffm.elastic  # noqa: F401  (registers the elastic classes with the Auto factories)
from raffm.spec import ElasticSpec
from raffm_app.cli import main


def test_extract_to_memory_budget_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub"
    assert main(["extract", "--out", str(out), "--memory-mb", "150"]) == 0
    spec = ElasticSpec.from_json((out / "spec.json").read_text())
    costs = json.loads((out / "costs.json").read_text())
    recipe = json.loads((out / "recipe.json").read_text())
    assert costs["train_memory_mb"] <= 150
    # RaFFM's recipe: the embeddings and the first layer frozen, checkpointed to fit
    assert {n.split(".")[1] for n in recipe["frozen"]} == {"embeddings", "encoder"} and recipe["checkpointing"]
    assert all(".embeddings." in n or ".layer.0." in n for n in recipe["frozen"])
    model = AutoModel.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) <= costs["params"]  # the bare encoder lacks the task head
    # A real cut (fewer heads and FFN neurons), never of the residual stream.
    assert model.elastic_spec == spec and spec.hidden == 384 and spec.layers[0].heads < 12
    tokenizer = AutoTokenizer.from_pretrained(out)
    hidden = model(**tokenizer(["a gripping, funny film"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == spec.hidden and torch.isfinite(hidden).all()

    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"hidden {spec.hidden}, {spec.depth} layers" in printed
    assert f"{costs['params']:,} parameters" in printed
    assert f"peak training memory {costs['train_memory_mb']:.0f} MiB" in printed  # priced with its recipe, as cut


def test_inspect_prices_a_tied_causal_lm_as_extract_did(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """OPT's LM head is its token embedding: `raffm inspect` must count it once, as `raffm extract` priced it."""
    from tests.integration.llmkit import tiny_llama_folder

    model = tiny_llama_folder(tmp_path / "opt", model_type="opt")
    out, shape = tmp_path / "sub", ["--batch-size", "4", "--seq-len", "16"]
    assert main(["extract", "--model", str(model), "--out", str(out), "--memory-mb", "30", "--task", "causal-lm",
                 *shape]) == 0
    costs = json.loads((out / "costs.json").read_text())
    capsys.readouterr()
    assert main(["inspect", str(out), *shape]) == 0
    printed = capsys.readouterr().out
    assert f"{costs['params']:,} parameters" in printed, printed
    assert f"peak training memory {costs['train_memory_mb']:.0f} MiB" in printed


def test_a_vit_is_cut_for_images_without_being_told(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The task comes from the model (a ViT classifies images) and its sequence from its patches."""
    from raffm.models import model_from_config, small_vit_config

    vit = tmp_path / "vit"
    model_from_config(small_vit_config(num_labels=10), task="image-classification").save_pretrained(vit)
    out = tmp_path / "sub"
    assert main(["extract", "--model", str(vit), "--out", str(out), "--memory-mb", "150", "--num-labels", "10"]) == 0
    costs = json.loads((out / "costs.json").read_text())
    assert costs["seq_len"] == 17 and costs["train_memory_mb"] <= 150  # 16 patches of 7 x 7 and the class token
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ElasticViTForImageClassification"]
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f"peak training memory {costs['train_memory_mb']:.0f} MiB" in capsys.readouterr().out


def test_a_full_budget_extraction_is_the_original_model(tmp_path: Path) -> None:
    """Salience ordering moves heads and neurons, never the residual channels: whoever takes the backbone's hidden
    states gets the original model's, in its channel order."""
    from raffm.models import default_model_path

    out = tmp_path / "full"
    assert main(["extract", "--out", str(out), "--memory-mb", "100000"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state
        want = AutoModel.from_pretrained(default_model_path()).eval()(**batch).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5


def test_extract_from_spec_file(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"hidden": 384, "layers": [{"heads": 6, "head_dim": 16, "ffn": 512}] * 2}))
    out = tmp_path / "sub"
    assert main(["extract", "--out", str(out), "--spec", str(spec_file)]) == 0
    assert AutoModel.from_pretrained(out).elastic_spec == ElasticSpec.from_json(spec_file.read_text())


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden": 384, "layers": [{"heads": 13, "head_dim": 32, "ffn": 1536}]}))
    assert main(["extract", "--out", str(tmp_path / "a"), "--spec", str(bad)]) == 2
    assert "layer 0 heads is 13; it must be an integer between 1 and 12" in capsys.readouterr().err
    assert main(["extract", "--out", str(tmp_path / "b"), "--memory-mb", "5"]) == 2
    assert "raise --memory-mb" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["inspect", str(tmp_path)]) != 0
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "has no config.json; pass a folder written by `raffm extract`" in capsys.readouterr().err


def test_a_cut_matched_on_unlabelled_texts_follows_the_full_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from raffm.data import rotten_tomatoes

    texts = tmp_path / "reviews.csv"  # a text column only: nothing to label them
    texts.write_text("text\n" + "".join(f'"{t.replace(chr(34), "")}"\n' for t in rotten_tomatoes().texts[:150]))
    plain, matched = tmp_path / "plain", tmp_path / "matched"
    assert main(["extract", "--out", str(plain), "--memory-mb", "150"]) == 0
    capsys.readouterr()
    assert main(["extract", "--out", str(matched), "--memory-mb", "150", "--match", str(texts),
                 "--match-samples", "120"]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"matched on 120 unlabelled inputs of .*reviews.csv: the cut predicts what the full model "
                      r"predicts for (\d+)% of them before, (\d+)% after", printed)
    assert found and int(found[2]) >= int(found[1]), printed
    heads = [load_file(folder / "model.safetensors") for folder in (plain, matched)]
    moved = {name for name in heads[0] if name.startswith("bert.") and not torch.equal(heads[0][name], heads[1][name])}
    # the projections into and out of the heads and FFN neurons, in every layer, and nothing else of the body (no
    # normalization, no embedding; the head is drawn afresh)
    assert moved == {f"bert.encoder.layer.{i}.{m}.{p}" for i in range(6)
                     for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                               "attention.output.dense", "intermediate.dense", "output.dense")
                     for p in ("weight", "bias")}, sorted(moved)
    assert main(["extract", "--out", str(tmp_path / "few"), "--memory-mb", "150", "--match", str(texts),
                 "--match-samples", "5"]) == 2
    assert "matching a cut needs at least 10 inputs" in capsys.readouterr().err and not (tmp_path / "few").exists()


def test_a_cut_served_at_a_label_prior_predicts_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    from raffm.data import rotten_tomatoes

    reviews = rotten_tomatoes().texts[:150]
    texts = tmp_path / "reviews.csv"
    texts.write_text("text\n" + "".join(f'"{t.replace(chr(34), "")}"\n' for t in reviews))
    out = tmp_path / "served"
    assert main(["extract", "--out", str(out), "--memory-mb", "150", "--match", str(texts), "--match-samples", "120",
                 "--label-prior", "1,3"]) == 0
    assert "serving threshold fitted to the label prior 1,3 on 120 inputs" in capsys.readouterr().out
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["label_prior"] == [0.25, 0.75] and threshold["inputs"] == 120
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tokenizer(reviews[:120], padding=True, truncation=True, max_length=64,
                                   return_tensors="pt")).logits
    assert float((logits.argmax(-1) == 1).float().mean()) == pytest.approx(0.75, abs=0.02)

    assert main(["extract", "--out", str(tmp_path / "a"), "--memory-mb", "150", "--label-prior", "1,3"]) == 2
    assert "give them with --match" in capsys.readouterr().err
    assert main(["extract", "--out", str(tmp_path / "b"), "--memory-mb", "150", "--match", str(texts),
                 "--label-prior", "0.2,0.3,0.5"]) == 2
    assert "has 3 values; the model has 2 labels" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
