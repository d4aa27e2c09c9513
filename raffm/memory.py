"""Measuring peak training memory on CPU, honestly.

**Training memory** is the peak resident set size (RSS) while a model is loaded and trained, minus the RSS just
before the model's training state exists. The Python interpreter, the imported libraries (torch, transformers) and
their lazily initialised runtime (thread pools, kernel caches: warmed up by one tiny training step first, see
:func:`training_peak`) are the process's fixed cost and are *excluded*; weights, gradients, optimizer state,
activations, temporaries and allocator slack are *included*.

How: Linux keeps a high-water mark of RSS (``VmHWM`` in ``/proc/self/status``); writing ``5`` to
``/proc/self/clear_refs`` resets it to the current RSS, so ``VmHWM - RSS at entry`` is the peak of the block. Where
``clear_refs`` is not writable the fallback is ``resource.getrusage().ru_maxrss``, a lifetime maximum that cannot be
reset: it is exact only in a fresh process whose earlier peak was below the block's (``PeakMemory.exact`` says which
applies). For clean numbers measure in a fresh subprocess (:func:`measure_training_peak`).

Units: MB here means MiB (2**20 bytes), as everywhere in :mod:`raffm.costs` and ``--memory-mb``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

MIB = 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def configure_allocator(mmap_threshold: int = 64 * 1024) -> bool:
    """Make glibc return freed tensor memory to the OS at once; False where that is not possible (non-glibc).

    By default glibc raises its mmap threshold after the first large free (up to 32 MiB), so later activation
    tensors live in the heap and stay resident after they are freed: measured on MiniLM at batch 16 x 64 tokens,
    that slack added about 240 MiB (+50%) to the peak, unpredictably. With a fixed threshold every tensor above it
    is its own mapping, freed memory leaves RSS, and the peak is what :mod:`raffm.costs` predicts. Call it once at
    process start, before training (the edge agent does); it costs a page fault per fresh page.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, mmap_threshold))


def _status_kib(field: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of ``/proc/self/status``; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    kib = _status_kib("VmRSS")
    if kib is None:  # no /proc: the best available is the lifetime peak
        return _maxrss_mb()
    return kib / 1024


def peak_rss_mb() -> float:
    """High-water mark of RSS in MiB since the process started or the last :func:`reset_peak`."""
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else _maxrss_mb()


_shared = 0  # depth of shared_process() blocks open in this process


@contextmanager
def shared_process() -> Iterator[None]:
    """While the block runs, many workloads share this process (a simulator's agents, as threads).

    RSS and its high-water mark are the process's, so none of them can measure its own peak. Measurements then skip
    what makes a lone workload's peak exact, the full garbage collections and the high-water-mark reset (a full
    collection scans every agent's objects: with 250 agents in one process, the five around each agent's round took
    about half of the fleet's CPU time), and :class:`PeakMemory` reports ``exact=False``.
    """
    global _shared
    _shared += 1
    try:
        yield
    finally:
        _shared -= 1


def process_shared() -> bool:
    """Whether a :func:`shared_process` block is running."""
    return _shared > 0


def collect_garbage() -> None:
    """``gc.collect()``, so that freed-but-unreachable objects leave RSS before a measurement; nothing while a
    :func:`shared_process` block runs."""
    if not _shared:
        gc.collect()


def start_measuring() -> bool:
    """Collect garbage and reset the RSS high-water mark, so that the peak from here on is the coming block's; False
    where that cannot be (no ``clear_refs``, or a shared process, where nothing is done)."""
    if _shared:
        return False
    gc.collect()
    return reset_peak()


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """Peak RSS growth of a block: ``with PeakMemory() as pm: train(); pm.peak_mb``.

    ``baseline_mb``: RSS at entry; ``peak_mb``: highest RSS during the block minus ``baseline_mb``; ``exact``: False
    when the high-water mark could not be reset (lifetime ``ru_maxrss`` used; then run the block in a fresh process).
    """

    def __init__(self) -> None:
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self.exact = False

    def __enter__(self) -> PeakMemory:
        self.exact = start_measuring()  # freed-but-uncollected garbage of earlier work should not count as baseline
        self.baseline_mb = rss_mb()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        peak = peak_rss_mb() if self.exact else _maxrss_mb()
        self.peak_mb = max(0.0, peak - self.baseline_mb)


@dataclass(frozen=True)
class TrainingPeak:
    """One measurement of a training run (MiB)."""

    peak_mb: float  # peak RSS growth from before the model was loaded to the end of training
    baseline_mb: float  # RSS of the warmed-up runtime, excluded
    exact: bool
    params: int
    steps: int


def warm_up_runtime(config: Any, batch_size: int, seq_len: int) -> None:
    """Two training steps of a one-layer model of the same family and width (a 64-token vocabulary), so the runtime's
    lazy init is not charged to the model. The width matters: BLAS libraries size their per-thread packing buffers
    by the matrices they first multiply, and keep them (a constant 15 MiB on some CPUs, none on others)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForSequenceClassification

    values = config.to_dict()
    for key in ("raffm_spec", "transformers_version", "architectures", "_name_or_path"):
        values.pop(key, None)
    model_type = values.pop("model_type").removeprefix("raffm_")
    values.update(num_hidden_layers=1, vocab_size=64)
    image = _is_image(config)
    auto: Any = AutoModelForImageClassification if image else AutoModelForSequenceClassification
    tiny = auto.from_config(AutoConfig.for_model(model_type, **values))
    _train(tiny, batch_size=batch_size, seq_len=seq_len, steps=2, vocab=64, image=image)
    del tiny
    gc.collect()
    torch.manual_seed(0)


def warm_up_config(data: Any) -> Any:
    """What to warm the runtime up with before the job's own config is known (a device's first round, before its
    download): BERT-base for text; for images, a small ViT of the data's size and channels in 4 x 4 patches."""
    from transformers import BertConfig

    from raffm.data import ImageDataset
    from raffm.models import small_vit_config

    if not isinstance(data, ImageDataset):
        return BertConfig()
    channels, size, _ = data.shape
    return small_vit_config(num_labels=max(data.num_labels, 2), image_size=size, num_channels=channels,
                            patch_size=max(1, size // 4))


def _is_image(config: Any) -> bool:
    """Whether a config is a ViT's (its ``architectures`` may be gone: a device's global config drops them)."""
    from raffm.arch import adapter_for

    return adapter_for(config).name == "vit"


def _random_images(config: Any, n: int) -> Any:
    """``n`` random images of the size and channels a ViT config takes, their labels spread over its labels."""
    import torch

    from raffm.data import ImageDataset

    size, channels, labels = int(config.image_size), int(config.num_channels), int(config.num_labels)
    images = torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(0))
    return ImageDataset(images, [i % labels for i in range(n)], tuple(str(i) for i in range(labels)))


def _train(model: Any, *, batch_size: int, seq_len: int, steps: int, vocab: int, image: bool = False) -> None:
    """``steps`` plain AdamW steps (forward, backward, step, zero_grad) on random tokens or images; model in train
    mode."""
    import torch

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, int(model.config.num_labels), (batch_size,), generator=generator)
    if image:
        inputs = {"pixel_values": _random_images(model.config, batch_size).pixels()}
    else:
        inputs = {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=generator),
                  "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class _RandomTokens:
    """A stand-in tokenizer: random token ids of the model's vocabulary (memory does not depend on the text)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, texts: list[str], *, max_length: int, **_: Any) -> dict[str, Any]:
        import torch

        generator = torch.Generator().manual_seed(len(texts))
        ids = torch.randint(0, self.vocab, (len(texts), max_length), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def training_peak(
    model_dir: str | Path, *, batch_size: int, seq_len: int, steps: int = 3, recipe: dict[str, Any] | None = None
) -> TrainingPeak:
    """Load a saved model from ``model_dir`` and train it the way a device does (:func:`raffm.training.train_local`
    with ``recipe``, the received weights spilled to disk and memory-mapped), measuring peak memory. A sequence
    classifier trains on random tokens, an image classifier on random images (``seq_len``: its tokens per image); a
    causal LM (``*ForCausalLM`` in its config) on prompt -> response pairs through the folder's own tokenizer, of
    every length up to ``seq_len`` (so most rows are padded, as real data is).

    The run is done twice and the second measured: what the runtime allocates once and keeps (kernel caches, BLAS
    buffers per matrix shape and thread, the loop's code paths) is then in the baseline on every CPU, and the peak
    is the steady state of a device that has trained before. That first-run cost varies by CPU (9 MiB on top of
    :func:`warm_up_runtime`'s on an AMD EPYC; a CI machine charged ELECTRA-small's first run about 13 MiB more
    than that) and is priced separately (:data:`raffm.costs.OVERHEAD_MB`).

    Run this in a fresh process (:func:`measure_training_peak`): the interpreter's earlier allocations then neither
    pollute the baseline nor hide in freed heap that the training would reuse. At least 2 steps are needed to see
    the steady state (AdamW state exists from the first ``step()`` on, so step 2's backward is the usual peak).
    """
    import tempfile

    import torch
    from transformers import (
        AutoConfig, AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    import raffm.elastic  # noqa: F401  (registers the elastic classes with the Auto factories)
    from raffm.data import TextDataset
    from raffm.generative import InstructionDataset
    from raffm.recipe import Recipe
    from raffm.training import LocalConfig, train_local

    if steps < 1:
        raise ValueError(f"steps is {steps}; it must be at least 1")
    configure_allocator()
    config = AutoConfig.from_pretrained(model_dir)
    plan = Recipe.from_dict(recipe or {})
    rows = batch_size * steps
    tokenizer: Any
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in config.architectures or ()):  # GPT-2's
        auto: Any = AutoModelForCausalLM
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        data: Any = InstructionDataset([" ".join(["a"] * (1 + i * 7 % seq_len)) for i in range(rows)], [" a"] * rows)
    elif _is_image(config):
        auto, tokenizer, data = AutoModelForImageClassification, None, _random_images(config, rows)
    else:
        auto = AutoModelForSequenceClassification
        tokenizer = _RandomTokens(int(config.vocab_size))
        data = TextDataset(["x"] * rows, [i % int(config.num_labels) for i in range(rows)],
                           tuple(str(i) for i in range(int(config.num_labels))))

    def run() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            model = auto.from_pretrained(model_dir)
            for p in model.parameters():  # off the memory-mapped file into anonymous memory, as a device's download
                p.data = p.data.clone()
            gc.collect()
            params = sum(p.numel() for p in model.parameters())
            reference = None  # LoRA: train_local keeps its own copy of the fresh adapters
            if not plan.lora_rank:
                spill = Path(tmp) / "received.pt"
                torch.save({n: p.detach() for n, p in model.named_parameters() if n not in plan.frozen}, spill)
                reference = torch.load(spill, mmap=True, weights_only=True)
            train_local(model, data, tokenizer,
                        LocalConfig(batch_size=batch_size, seq_len=seq_len, lr=1e-5, local_steps=steps,
                                    weight_decay=0.0),
                        recipe=plan, reference=reference)
            del model, reference
        return params

    run()
    with PeakMemory() as pm:
        params = run()
    torch.manual_seed(0)
    return TrainingPeak(pm.peak_mb, pm.baseline_mb, pm.exact, params, steps)


def measure_training_peak(
    model_dir: str | Path, *, batch_size: int, seq_len: int, steps: int = 3, threads: int | None = None,
    recipe: dict[str, Any] | None = None,
) -> TrainingPeak:
    """:func:`training_peak` in a fresh ``python -m raffm.memory`` subprocess; raises ``RuntimeError`` if it fails."""
    cmd = [sys.executable, "-m", "raffm.memory", str(model_dir), "--batch-size", str(batch_size)]
    cmd += ["--seq-len", str(seq_len), "--steps", str(steps), "--recipe", json.dumps(recipe or {})]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return TrainingPeak(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raffm.memory", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recipe", type=json.loads, default={},
                        help="the client recipe as JSON (raffm.recipe.Recipe.to_dict): frozen tensors, nested cuts")
    args = parser.parse_args(argv)
    result = training_peak(args.model_dir, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                           recipe=args.recipe)
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
