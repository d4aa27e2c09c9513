"""LoRA on a device's slice: low-rank adapters wrapped around the sub-model's linear layers, everything else frozen.

A target ``nn.Linear`` of weight ``W [out, in]`` becomes a :class:`LoRALinear` computing
``y = x W^T + b + s * (x A^T) B^T`` with ``A [r, in]``, ``B [out, r]`` and ``s = alpha / r``. ``B`` starts at zero
(so the adapted model is the base model until the first step) and ``A`` at PyTorch's default ``nn.Linear`` init
(uniform in ``+-1/sqrt(in)``), as in the LoRA paper and ``peft``. Only ``A`` and ``B`` are trained: the base weights
stay frozen on the device and are never re-sent (a round moves adapters, see :mod:`raffm.lora_fed`).

Adapters follow the *stored* weight: for a weight stored ``[rows, cols]``, ``B [rows, r]`` and ``A [r, cols]``, so
``s B A`` is the update of the stored tensor, which is all that :func:`adapter_shapes`, the cost model and
:mod:`raffm.lora_fed` need to know. transformers' ``Conv1D`` (GPT-2's projections) stores ``W [in, out]`` and computes
``y = x W + b``; its :class:`LoRAConv1D` computes ``y = x W + b + s (x B) A`` with ``B [in, r]`` (zero at the start)
and ``A [r, out]`` (uniform in ``+-1/sqrt(out)``, as :func:`raffm.lora_fed.redistribute` draws spare rows).

Names are stable and tied to the base tensor they adapt: the adapters of module ``model.layers.0.self_attn.q_proj``
are ``model.layers.0.self_attn.q_proj.lora_A`` / ``.lora_B``, and they adapt ``model.layers.0.self_attn.q_proj.weight``
(:func:`base_weight_name`). The base weight and bias keep their own names and :class:`LoRALinear` *is* an
``nn.Linear`` (:class:`LoRAConv1D` a ``Conv1D``), so slicing, SPP tables and ``isinstance`` checks see the same
parameters as before wrapping.

Target modules are given by name, peft-style: a target ``t`` matches a module named ``t`` or ending in ``.t``
(``DEFAULT_TARGETS`` per architecture: Llama ``q/k/v/o_proj, gate/up/down_proj``; BERT ``query/key/value/dense``;
DeBERTa ``query_proj/key_proj/value_proj/dense``; OPT ``q/k/v/out_proj, fc1/fc2``; Phi ``q/k/v_proj, dense,
fc1/fc2``; GPT-2 ``c_attn, c_proj, c_fc``; GPT-NeoX ``query_key_value, dense, dense_h_to_4h, dense_4h_to_h``;
ModernBERT ``Wqkv, Wo, Wi``).
A target that matches nothing, or matches a module that is neither an ``nn.Linear`` nor a ``Conv1D``, is a
``ValueError``.

:func:`apply_lora` and :func:`merge_lora` change the model in place (like ``torch.nn.utils.prune``); the
adapter-state functions never mutate their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

# Architecture adapter name -> default target modules (every linear layer of every transformer block).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "bert": ("query", "key", "value", "dense"),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "vit": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # c_proj: the attention output's and the FFN's
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "modernbert": ("Wqkv", "Wo", "Wi"),  # Wo: the attention output's and the FFN's
}
A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class LoRAConfig:
    """``rank`` r >= 1; ``alpha`` > 0 (scaling ``alpha / rank``); ``targets``: module names (see module doc);
    ``dropout``: on the adapter's input only, in training mode."""

    rank: int
    targets: tuple[str, ...]
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank is {self.rank!r}; it must be an integer >= 1")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha is {self.alpha!r}; it must be a finite number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout is {self.dropout!r}; it must be in [0, 1)")
        if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"LoRA targets are {self.targets!r}; give a non-empty tuple of module names")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _LoRA(nn.Module):
    """A wrapped layer's shared (not copied) ``weight [rows, cols]`` and ``bias``, frozen, and its trained adapters
    ``lora_B [rows, r]`` (zeros) and ``lora_A [r, cols]`` (uniform in ``+-1/sqrt(cols)``; kaiming_uniform_(a=sqrt(5)),
    nn.Linear's and peft's default)."""

    def _adapt(self, base: nn.Linear | Conv1D, rank: int, scaling: float, dropout: float,
               generator: torch.Generator | None) -> None:
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        rows, cols = self.weight.shape
        dtype, device = self.weight.dtype, self.weight.device
        bound = 1.0 / math.sqrt(cols)
        a = torch.empty(rank, cols, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(rows, rank, dtype=dtype, device=device))

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A``, the stored weight's shape: what this adapter adds to ``weight``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


class LoRALinear(_LoRA, nn.Linear):
    """An ``nn.Linear`` with a low-rank residual: ``weight [out, in]``, ``lora_A [r, in]``, ``lora_B [out, r]``."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self._adapt(base, rank, scaling, dropout, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


class LoRAConv1D(_LoRA, Conv1D):
    """A transformers ``Conv1D`` with a low-rank residual: ``weight [in, out]``, ``lora_B [in, r]``,
    ``lora_A [r, out]``; ``y = x W + b + s (x B) A``."""

    def __init__(self, base: Conv1D, rank: int, scaling: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        self.nx, self.nf = base.nx, base.nf
        self._adapt(base, rank, scaling, dropout, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Conv1D.forward(self, x) + (self.dropout(x) @ self.lora_B) @ self.lora_A * self.scaling


_WRAPPERS: dict[type[nn.Module], Callable[..., _LoRA]] = {nn.Linear: LoRALinear, Conv1D: LoRAConv1D}


def base_weight_name(adapter_name: str) -> str:
    """``...q_proj.lora_A`` (or ``.lora_B``) -> ``...q_proj.weight``, the base tensor it adapts."""
    for suffix in (A_SUFFIX, B_SUFFIX):
        if adapter_name.endswith(suffix):
            return adapter_name[: -len(suffix)] + ".weight"
    raise ValueError(f"{adapter_name!r} is not a LoRA adapter tensor name (it must end in {A_SUFFIX} or {B_SUFFIX})")


def module_name(weight_name: str) -> str:
    """``...q_proj.weight`` -> ``...q_proj``."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name!r} is not a weight tensor name (it must end in .weight)")
    return weight_name[: -len(".weight")]


def matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def target_weight_names(names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """The ``.weight`` tensors among state-dict ``names`` whose module a target matches (shape-only planning: the
    cost model and the server use this without building a model). Raises for a target matching nothing."""
    targets = tuple(targets)
    found = [n for n in names if n.endswith(".weight") and matches(module_name(n), targets)]
    unused = [t for t in targets if not any(matches(module_name(n), (t,)) for n in found)]
    if unused:
        raise ValueError(f"LoRA target module(s) {unused} match no weight tensor of the model")
    return found


def apply_lora(model: nn.Module, config: LoRAConfig, *, generator: torch.Generator | None = None) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`LoRALinear` and freeze every other parameter
    (in place; returns ``model``). ``generator`` seeds the ``A`` init."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora() it first")
    chosen = {name: m for name, m in model.named_modules() if name and matches(name, config.targets)}
    unused = [t for t in config.targets if not any(matches(name, (t,)) for name in chosen)]
    if unused:
        raise ValueError(f"LoRA target module(s) {unused} match no module of {type(model).__name__}")
    wrong = {name: type(m).__name__ for name, m in chosen.items() if type(m) not in _WRAPPERS}
    if wrong:
        raise ValueError(f"LoRA targets must be nn.Linear or Conv1D layers; these are not: {wrong}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in chosen.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, _WRAPPERS[type(layer)](layer, config.rank, config.scaling, config.dropout, generator))
    return model


def lora_modules(model: nn.Module) -> dict[str, _LoRA]:
    """Module name -> :class:`LoRALinear` or :class:`LoRAConv1D`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _LoRA)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors (detached copies): ``<module>.lora_A [r, cols]`` and ``<module>.lora_B [rows, r]``."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[name + A_SUFFIX] = m.lora_A.detach().clone()
        out[name + B_SUFFIX] = m.lora_B.detach().clone()
    return out


def adapter_shapes(weight_shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """Adapter tensor name -> shape for rank-``rank`` adapters on the given target weights ``[rows, cols]`` (as
    stored: ``[out, in]`` for ``nn.Linear``, ``[in, out]`` for ``Conv1D``)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in weight_shapes.items():
        if len(shape) != 2:
            raise ValueError(f"LoRA adapts 2-D weights; {name!r} has shape {tuple(shape)}")
        out[module_name(name) + A_SUFFIX] = (rank, shape[1])
        out[module_name(name) + B_SUFFIX] = (shape[0], rank)
    return out


@torch.no_grad()
def load_adapters(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's :class:`LoRALinear` layers. ``state`` must name exactly the model's
    adapters, each pair of one rank (which may differ from the one the model was wrapped with: the layer takes the
    rank of what it is given, as when the server sends factors of another rank)."""
    modules = lora_modules(model)
    expected = {n + s for n in modules for s in (A_SUFFIX, B_SUFFIX)}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter state does not match the model's adapters: missing {missing[:5]}, unknown {extra[:5]}")
    for name, m in modules.items():
        a, b = state[name + A_SUFFIX], state[name + B_SUFFIX]
        rows, cols = m.weight.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != cols or b.shape[0] != rows \
                or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise ValueError(
                f"adapters of {name!r} have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; expected "
                f"A [r, {cols}] and B [{rows}, r] with the same r >= 1"
            )
        rank = a.shape[0]
        if rank != m.rank:  # the scaling alpha / r stays the layer's: the factors carry the product, see lora_fed
            m.lora_A = nn.Parameter(torch.empty(rank, cols, dtype=m.weight.dtype, device=m.weight.device))
            m.lora_B = nn.Parameter(torch.empty(rows, rank, dtype=m.weight.dtype, device=m.weight.device))
            m.rank = rank
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (``W + s B A``) and put back plain ``nn.Linear`` / ``Conv1D`` layers,
    in place; returns ``model``. The merged model computes what the adapted one did (inference: no adapter overhead)."""
    for name, m in lora_modules(model).items():
        if isinstance(m, LoRAConv1D):
            with torch.device("meta"):
                layer: nn.Linear | Conv1D = Conv1D(m.nf, m.nx)
        else:
            assert isinstance(m, LoRALinear)
            layer = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        layer.weight = nn.Parameter(m.weight + m.delta_weight().to(m.weight.dtype), requires_grad=False)
        layer.bias = m.bias
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, layer)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
