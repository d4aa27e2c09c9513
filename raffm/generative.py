"""Generative (causal-LM) tasks: prompt -> response pairs, batched so the loss sees the response tokens only, and
evaluated by greedy decoding (exact match) and mean response-token loss.

- :class:`InstructionDataset` holds the pairs; :func:`load_instructions` reads what ``--data`` names: a CSV/JSON
  file of pairs (``{"prompt": ..., "response": ...}``, :func:`load_instruction_file`), the shipped sentiment task
  (:func:`rotten_tomatoes_instructions`: ``"Review: <text>\\nSentiment:"`` -> ``" positive"`` / ``" negative"``), or
  any labelled text file a classifier would take, each text asked for its label's name
  (:func:`labelled_instructions`); :func:`with_chat_template` renders the prompts with the tokenizer's chat template
  (instruction-tuned models such as SmolLM2-Instruct).
- :func:`causal_batches` tokenizes a pair as ``[start] prompt response [end]`` and sets ``labels`` to -100 on the
  start, the prompt and the padding, so a Hugging Face causal LM's own ``loss`` is the mean cross-entropy of the
  response tokens. The start token is the tokenizer's BOS (else CLS), the end token its EOS (else SEP): with an end
  token the model learns where an answer stops, which exact match needs.
- Padding: right padding for training (positions are 0, 1, ... as in the model's default); left padding (what
  generation needs, so every row's next token is at the same column) adds ``position_ids`` counted over the real
  tokens, so a left-padded row computes what the same row right-padded does.
- A pair longer than ``seq_len`` keeps its response (up to ``seq_len - 1`` tokens) and the *end* of its prompt
  (the start token stays): the instruction a template puts last (``Sentiment:``) is what the answer depends on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from raffm.data import TextDataset, load_text_file, read_records, rotten_tomatoes

IGNORE_INDEX = -100  # what Hugging Face losses (and torch's cross_entropy) skip
SENTIMENT_PROMPT = "Review: {text}\nSentiment:"
SENTIMENT_ANSWERS = (" negative", " positive")  # rotten, fresh (raffm.data.rotten_tomatoes label order)
LABEL_PROMPT = "Text: {text}\nLabel:"
PaddingSide = Literal["left", "right"]
Tokenizer = Callable[..., Any]


@dataclass(frozen=True)
class InstructionDataset:
    """Prompt -> response pairs for causal-LM fine-tuning; ``responses[i]`` is the text that follows ``prompts[i]``
    (a leading space, as in ``" positive"``, is part of it)."""

    prompts: list[str]
    responses: list[str]

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.responses):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, indices: Sequence[int]) -> InstructionDataset:
        return InstructionDataset([self.prompts[i] for i in indices], [self.responses[i] for i in indices])


def load_instruction_file(path: str | Path, *, prompt_field: str = "prompt",
                          response_field: str = "response") -> InstructionDataset:
    """A CSV or JSON file (:func:`raffm.data.read_records`) whose records have a non-empty string ``prompt_field`` and
    ``response_field``. ``ValueError`` names the file and the place of the first bad record."""
    prompts: list[str] = []
    responses: list[str] = []
    for where, row in read_records(path):
        for field in (prompt_field, response_field):
            if field not in row:
                raise ValueError(f"{path} {where} lacks field {field!r}: has {sorted(row)}")
            value = row[field]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{path} {where}: field {field!r} must be a non-empty string, got {value!r}")
        prompts.append(str(row[prompt_field]))
        responses.append(str(row[response_field]))
    if not prompts:
        raise ValueError(f"data file {path} has no records")
    return InstructionDataset(prompts, responses)


def rotten_tomatoes_instructions(*, template: str = SENTIMENT_PROMPT,
                                 answers: tuple[str, str] = SENTIMENT_ANSWERS) -> InstructionDataset:
    """The shipped Rotten Tomatoes reviews (:func:`raffm.data.rotten_tomatoes`) as a generative task: ``template``
    (with ``{text}``) -> ``answers[label]`` (rotten, fresh)."""
    if "{text}" not in template:
        raise ValueError(f"the prompt template {template!r} has no {{text}} field")
    reviews = rotten_tomatoes()
    return InstructionDataset([template.format(text=t) for t in reviews.texts], [answers[y] for y in reviews.labels])


def labelled_instructions(data: TextDataset, *, template: str = LABEL_PROMPT) -> InstructionDataset:
    """A labelled text set as a generative task: ``template`` (with ``{text}``) -> the label's name after a space (the
    label number where the file's labels are numbers)."""
    if "{text}" not in template:
        raise ValueError(f"the prompt template {template!r} has no {{text}} field")
    texts = data.texts if data.pairs is None else [f"{t}\n{p}" for t, p in zip(data.texts, data.pairs)]
    return InstructionDataset([template.format(text=t) for t in texts],
                              [f" {data.label_names[y]}" for y in data.labels])


def first_record(path: str | Path) -> dict[str, object] | None:
    """The first record of a CSV or JSON file (None: no such file, or none :func:`raffm.data.read_records` reads)."""
    path = Path(path)
    if path.suffix in (".pt", ".npz") or not path.is_file():
        return None
    try:
        records = read_records(path)
    except ValueError:
        return None
    return records[0][1] if records else None


def is_pairs_file(path: str | Path) -> bool:
    """Whether ``path`` is a CSV or JSON file whose first record has ``prompt`` and ``response``."""
    row = first_record(path)
    return row is not None and "prompt" in row and "response" in row


def load_instructions(spec: str, *, text_column: str = "", label_column: str = "",
                      label_names: Sequence[str] = ()) -> InstructionDataset:
    """The prompt -> response pairs ``--data`` names for a causal-LM job: ``rotten_tomatoes`` as sentiment
    instructions, a CSV/JSON file of pairs, or a labelled CSV/JSON text file (:func:`labelled_instructions`; columns and
    labels as :func:`raffm.data.load_text_file` reads them). ``ValueError`` for image data, and names the file and
    line of a bad record."""
    path = Path(spec).expanduser()
    if spec == "rotten_tomatoes":
        return rotten_tomatoes_instructions()
    if spec == "mnist" or path.suffix in (".pt", ".npz"):
        raise ValueError(f"data {spec!r} is image data; a causal-lm job trains on prompt -> response pairs (a "
                         "JSON file of them, a labelled CSV/JSON text file, or rotten_tomatoes)")
    row = first_record(path)
    if row is None or "prompt" in row or "response" in row:
        return load_instruction_file(path)  # pairs, or what is wrong with the file
    try:
        labelled = load_text_file(path, text_column=text_column, label_column=label_column, label_names=label_names)
    except ValueError as exc:
        raise ValueError(f"{exc}; or give prompt -> response pairs ('prompt' and 'response' fields)") from None
    return labelled_instructions(labelled)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def with_chat_template(data: InstructionDataset, tokenizer: Any, *, system: str | None = None) -> InstructionDataset:
    """The pairs rendered for an instruction-tuned model: each prompt becomes the user turn of the tokenizer's chat
    template (with the assistant turn opened), each response the assistant's text (leading spaces dropped: the
    template already separates the turns). ``ValueError`` when the tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; use the plain prompts")
    head = [{"role": "system", "content": system}] if system else []
    prompts = [tokenizer.apply_chat_template([*head, {"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in data.prompts]
    return InstructionDataset(prompts, [r.lstrip() for r in data.responses])


# ----------------------------------------------------------------------------------------------------- batching


def _token_id(tokenizer: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def start_id(tokenizer: Any) -> int | None:
    return _token_id(tokenizer, "bos_token_id", "cls_token_id")


def end_id(tokenizer: Any) -> int | None:
    return _token_id(tokenizer, "eos_token_id", "sep_token_id")


def pad_id(tokenizer: Any) -> int:
    """Any id works (padding is masked out and never a label); Llama tokenizers have no pad token."""
    return _token_id(tokenizer, "pad_token_id", "eos_token_id", "sep_token_id") or 0


def _ids(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_prompts(tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    """``[start] prompt`` token ids (no start token added when the text already begins with it, as a rendered chat
    template may)."""
    start = start_id(tokenizer)
    out = _ids(tokenizer, prompts)
    return [ids if start is None or ids[:1] == [start] else [start, *ids] for ids in out]


def encode_responses(tokenizer: Tokenizer, responses: list[str]) -> list[list[int]]:
    """``response [end]`` token ids."""
    end = end_id(tokenizer)
    return [ids + ([end] if end is not None else []) for ids in _ids(tokenizer, responses)]


def _fit(prompt: list[int], response: list[int], seq_len: int, start: int | None) -> tuple[list[int], list[int]]:
    """Cut a pair to ``seq_len`` tokens: the response keeps up to ``seq_len - 1``, the prompt its start token and its
    last tokens."""
    response = response[: seq_len - 1]
    room = seq_len - len(response)
    if len(prompt) > room:
        keep_start = start is not None and prompt[0] == start and room >= 2
        head = prompt[:1] if keep_start else []
        prompt = head + prompt[len(prompt) - (room - len(head)):]
    return prompt, response


def pad_rows(rows: list[list[int]], labels: list[list[int]], *, length: int, pad: int,
             side: PaddingSide) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` ``[B, length]`` (plus ``position_ids`` for left padding)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side is {side!r}; it must be 'left' or 'right'")
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, IGNORE_INDEX)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        cols = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
        target[i, cols] = torch.tensor(lab, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": target}
    if side == "left":  # the model's default positions (0, 1, ... by column) would start each row at its padding
        batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return batch


def collate(tokenizer: Tokenizer, prompts: list[str], responses: list[str], seq_len: int, *,
            padding_side: PaddingSide = "right", pad_to_longest: bool = False) -> dict[str, torch.Tensor]:
    """One causal-LM batch ``[B, seq_len]`` (``[B, longest]`` with ``pad_to_longest``) whose ``labels`` are the
    response tokens and -100 elsewhere (start, prompt, padding)."""
    if seq_len < 2:
        raise ValueError(f"seq_len is {seq_len}; a causal-LM pair needs at least 2 tokens")
    start = start_id(tokenizer)
    rows: list[list[int]] = []
    labels: list[list[int]] = []
    for p, r in zip(encode_prompts(tokenizer, prompts), encode_responses(tokenizer, responses)):
        if not r:
            raise ValueError("a response tokenized to nothing; responses must be non-empty")
        p, r = _fit(p, r, seq_len, start)
        rows.append(p + r)
        labels.append([IGNORE_INDEX] * len(p) + r)
    length = max(map(len, rows)) if pad_to_longest else seq_len
    return pad_rows(rows, labels, length=length, pad=pad_id(tokenizer), side=padding_side)


def causal_batches(data: InstructionDataset, tokenizer: Tokenizer | None, batch_size: int, seq_len: int, *,
                   shuffle: bool, seed: int = 0, padding_side: PaddingSide = "right") -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready causal-LM batches of ``data`` (see :func:`collate`), in order or shuffled by ``seed``."""
    if tokenizer is None:
        raise ValueError("generative data needs a tokenizer")
    order = list(range(len(data)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for begin in range(0, len(order), batch_size):
        idx = order[begin : begin + batch_size]
        yield collate(tokenizer, [data.prompts[i] for i in idx], [data.responses[i] for i in idx], seq_len,
                      padding_side=padding_side)


# ----------------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class GenerativeScores:
    exact_match: float  # share of examples whose greedy answer equals the response (0..1)
    loss: float  # mean cross-entropy per response token (nats), the end token included
    examples: int
    tokens: int  # response tokens the loss averages over


def _normalise(text: str) -> str:
    return text.strip().lower()


@torch.no_grad()
def greedy_answers(model: Callable[..., Any], tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
                   seq_len: int) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (left-padded together), each cut before its first end token.

    ``model`` is anything called like a Hugging Face causal LM that returns ``logits`` ``[B, T, V]``: a global
    model, an extracted sub-model, a :class:`raffm.training.NestedCut`. No KV cache (the whole prefix is recomputed
    per token): answers here are a few tokens, and a cut's skeleton need not support caching.
    """
    end = end_id(tokenizer)
    start = start_id(tokenizer)
    budget = max(1, seq_len - max_new_tokens)
    rows = [_fit(p, [], budget, start)[0] for p in encode_prompts(tokenizer, prompts)]
    batch = pad_rows(rows, rows, length=max(map(len, rows)), pad=pad_id(tokenizer), side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    done = torch.zeros(len(rows), dtype=torch.bool)
    out: list[list[int]] = [[] for _ in rows]
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1)
        for i in range(len(rows)):
            if not done[i] and int(nxt[i]) != end:
                out[i].append(int(nxt[i]))
        done |= nxt == end if end is not None else torch.zeros_like(done)
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


@torch.no_grad()
def evaluate_generative(model: Any, data: InstructionDataset, tokenizer: Any, *, batch_size: int = 16,
                        seq_len: int = 64, max_new_tokens: int | None = None) -> GenerativeScores:
    """Exact match of greedy answers and mean response-token loss of ``model`` on held-out ``data``.

    An answer matches when its text equals the reference's after both are decoded by the tokenizer (so its
    normalisation applies to both), stripped and lower-cased. Decoding stops at the end token, or after
    ``max_new_tokens`` (default: the longest reference in the batch, end token included). Without an end token
    (none in the tokenizer) an answer is compared on its reference's length in tokens.

    Fast path: the loss pass already has the model's prediction after every reference token (teacher forcing). When
    the argmax at every response position is the reference's token (its end token included), greedy decoding from
    the same prompt tokens would write exactly the reference, so the row counts as a match without decoding; only
    the other rows are decoded (their answer may still match after normalisation). A trained model answers most
    rows right, so its evaluation costs about one forward pass instead of one per answer token.
    """
    if len(data) == 0:
        raise ValueError("the evaluation data set is empty")
    module = model if isinstance(model, torch.nn.Module) else None  # a NestedCut runs in its model's mode
    was_training = bool(module is not None and module.training)
    if module is not None:
        module.eval()
    correct, loss_sum, tokens = 0, 0.0, 0
    has_end = end_id(tokenizer) is not None
    try:
        for begin in range(0, len(data), batch_size):
            prompts = data.prompts[begin : begin + batch_size]
            responses = data.responses[begin : begin + batch_size]
            batch = collate(tokenizer, prompts, responses, seq_len)
            labels = batch.pop("labels")
            logits = model(**batch, use_cache=False).logits[:, :-1]
            target = labels[:, 1:]
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE_INDEX,
                reduction="sum"))
            scored = target != IGNORE_INDEX
            tokens += int(scored.sum())
            references = _ids(tokenizer, responses)
            steps = max_new_tokens or max(len(r) for r in references) + int(has_end)
            # Teacher-forced rows: every response token (the whole reference and its end token, none cut) predicted.
            whole = torch.tensor([len(r) + int(has_end) for r in references])
            hits = ((logits.argmax(-1) == target) | ~scored).all(-1) & (scored.sum(-1) == whole) & (whole <= steps)
            correct += int(hits.sum())
            rest = [i for i in range(len(prompts)) if not bool(hits[i])]
            if not rest:
                continue
            answers = greedy_answers(model, tokenizer, [prompts[i] for i in rest], max_new_tokens=steps,
                                     seq_len=seq_len)
            for got, ref in zip(answers, [references[i] for i in rest]):
                got = got if has_end else got[: len(ref)]
                correct += _normalise(tokenizer.decode(got, skip_special_tokens=True)) == _normalise(
                    tokenizer.decode(ref, skip_special_tokens=True))
    finally:
        if module is not None:
            module.train(was_training)
    return GenerativeScores(exact_match=correct / len(data), loss=loss_sum / max(1, tokens), examples=len(data),
                            tokens=tokens)
