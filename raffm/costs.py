"""Cost model of an elastic sub-model: parameters, bytes on the wire, FLOPs and peak training memory.

Everything is computed from the *global* model's tensor shapes and a spec (no model is built), so the extractor can
plan a fleet quickly. Parameter counts are exact: they are the sub-shapes of :func:`raffm.slicing.slice_plan`.

Peak training memory (fp32 weights, AdamW, one ``forward, backward, step, zero_grad`` loop), in bytes::

    W = 4 * params                      weights; gradients are another W; AdamW keeps 2 W (exp_avg, exp_avg_sq)
    A = activations autograd saves      (below)
    X = 4 * T * (max_ffn + hidden)      gradient temporaries at the start of backward, T = batch * seq tokens
    P = 4 * numel(largest tensor)       AdamW (single-tensor, the CPU default) builds 2 temporaries of each tensor
    C = 8 MiB                           fixed: optimizer bookkeeping, masks, allocator pages
    train_memory = C + max(3W + A + X,  4W + 2P)
                          backward peak  optimizer-step peak (grads and both moments alive)

From step 2 on AdamW state exists during backward, so ``3W + A`` (weights, moments, activations) is live at the end of
forward; gradients only appear as activations are freed. The step peak dominates for small hidden widths with the
full vocabulary, where the embedding matrix is the largest tensor.

Activations ``A``: what autograd saves in torch 2.13 (CPU, ``attn_implementation="sdpa"``), counted with
``torch.autograd.graph.saved_tensors_hooks`` and matched exactly by this formula (test_costs checks it). With
``h`` the kept hidden width and, per layer, ``a = heads * head_dim``, ``f`` its FFN width and ``S = B * heads * L^2``
(all in fp32 elements, ``T = B * L``):

- BERT / RoBERTa (post-LN): embeddings ``2 T h`` (+``T h`` dropout mask); per layer ``T (4h + 4a + 2f) + 4T``
  (input, LayerNorm inputs/outputs; q, k, v, context; GELU input/output; LN statistics), plus ``2 T h`` dropout
  masks when hidden dropout > 0 (CPU dropout saves a float mask), plus ``3 S`` (softmax output, its dropout mask and
  the dropped probabilities: SDPA falls back to the math kernel with attention dropout) or ``B * heads * L`` (the
  log-sum-exp of the flash kernel) without attention dropout.
- ViT (pre-LN): the same per-layer terms; embeddings keep the pixels ``B * 3 * H * W`` and the final LayerNorm
  ``2 T h``; ``L`` is the number of patches + 1, read from the position embeddings.

Measured against RSS (``raffm.memory``, glibc allocator configured by ``configure_allocator``): within 2% for
MiniLM at batch 16 x 64 tokens across hidden widths 96-384. MB means MiB (2**20 bytes) throughout.
FedProx (a frozen copy of the received weights and its proximal term) adds about 2 W; it is not included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from raffm.arch import Adapter, adapter_for
from raffm.slicing import SlicePlan, slice_plan
from raffm.spec import ElasticSpec, ModelDims
from raffm.wire import itemsize, wire_dtype_name

MIB = 2**20
TRAIN_BYTES = 4  # fp32 training: weights, gradients, moments and activations
OVERHEAD_MB = 8.0  # measured fixed cost of a training loop beyond the formula (6-9 MiB on MiniLM)


def dtype_bytes(wire_dtype: str) -> int:
    """Bytes per element of a wire dtype (:mod:`raffm.wire`'s vocabulary); ``ValueError`` names the supported ones."""
    try:
        return itemsize(wire_dtype)
    except ValueError:
        raise ValueError(f"wire_dtype is {wire_dtype!r}; it must be one of float32, float16, bfloat16") from None


@dataclass(frozen=True)
class Costs:
    """Predicted costs of training one sub-model (memory in MiB, FLOPs per sample)."""

    params: int
    wire_dtype: str
    wire_bytes: int  # one direction: the slice down, or its delta up
    forward_flops_per_sample: float
    flops_per_sample: float  # training: forward + backward ~ 3x forward
    batch_size: int
    seq_len: int
    weights_mb: float
    gradients_mb: float
    optimizer_mb: float
    activations_mb: float
    overhead_mb: float
    train_memory_mb: float  # predicted peak; see the module docstring
    infer_memory_mb: float  # predicted peak of a no-grad forward at the same batch and sequence length

    def wire_bytes_as(self, wire_dtype: str) -> int:
        return self.params * dtype_bytes(wire_dtype)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Widths:
    """Per-layer kept widths of a spec: ``a`` = heads * head_dim, ``f`` = FFN neurons."""

    hidden: int
    heads: tuple[int, ...]
    a: tuple[int, ...]
    f: tuple[int, ...]


def _widths(spec: ElasticSpec) -> _Widths:
    return _Widths(
        hidden=spec.hidden,
        heads=tuple(l.heads for l in spec.layers),
        a=tuple(l.heads * l.head_dim for l in spec.layers),
        f=tuple(l.ffn for l in spec.layers),
    )


def forward_flops(w: _Widths, seq_len: int, *, num_labels: int, patch_inputs: int = 0) -> float:
    """Forward FLOPs of one sample of ``seq_len`` tokens (2 per multiply-add).

    Per layer: Q, K, V and output projections ``4 L h a``, FFN ``2 L h f``, attention scores and their product with
    V ``2 L^2 a``; then the pooler/head ``h^2 + h * labels``; ViT's patch projection ``L h * patch_inputs``.
    """
    h, length = w.hidden, seq_len
    macs = sum(4 * length * h * a + 2 * length * h * f + 2 * length * length * a for a, f in zip(w.a, w.f))
    macs += h * h + h * num_labels + (length - 1) * h * patch_inputs
    return 2.0 * macs


def activation_elements(
    w: _Widths,
    *,
    batch_size: int,
    seq_len: int,
    arch: str,
    hidden_dropout: bool,
    attention_dropout: bool,
    pixels: int = 0,
) -> int:
    """fp32 elements autograd saves for one training forward (see the module docstring for the terms)."""
    b, h, tokens = batch_size, w.hidden, batch_size * seq_len
    total = 2 * tokens * h + 2 * tokens + b * pixels  # embeddings LN input/output (BERT), or final LN (ViT)
    if hidden_dropout:
        total += tokens * h * (1 + 2 * len(w.a))
    for heads, a, f in zip(w.heads, w.a, w.f):
        total += tokens * (4 * h + 4 * a + 2 * f) + 4 * tokens
        total += 3 * b * heads * seq_len * seq_len if attention_dropout else b * heads * seq_len
    total += 4 * b * h  # pooler / classification head on the first token
    if arch != "vit":
        total += 3 * tokens  # int64 input ids and token types (2 elements' worth each / 2)
    return total


def peak_train_bytes(*, params: int, largest: int, activations: int, tokens: int, hidden: int, max_ffn: int) -> int:
    """``max(3W + A + X, 4W + 2P)`` in bytes (overhead excluded); arguments are element counts."""
    weights = TRAIN_BYTES * params
    backward = 3 * weights + TRAIN_BYTES * (activations + tokens * (max_ffn + hidden))
    step = 4 * weights + 2 * TRAIN_BYTES * largest
    return max(backward, step)


def peak_infer_bytes(w: _Widths, *, params: int, batch_size: int, seq_len: int) -> int:
    """A no-grad forward: weights plus the widest layer's live tensors (residual, q/k/v, scores; or the FFN)."""
    tokens = batch_size * seq_len
    live = max(
        max(3 * tokens * a + 3 * batch_size * heads * seq_len * seq_len, 2 * tokens * f)
        for heads, a, f in zip(w.heads, w.a, w.f)
    )
    return TRAIN_BYTES * (params + 3 * tokens * w.hidden + live)


class CostModel:
    """Costs of any spec of one global model, from its state-dict shapes.

    ``shapes``: global tensor name -> shape (``raffm.slicing.shapes_of(model.state_dict())``); ``hidden_dropout`` /
    ``attention_dropout``: whether training runs with dropout > 0 there (changes what autograd saves).
    """

    def __init__(
        self,
        adapter: Adapter,
        dims: ModelDims,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        hidden_dropout: bool | None = None,
        attention_dropout: bool | None = None,
    ) -> None:
        self.adapter = adapter
        self.dims = dims
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        default = adapter.name != "vit"  # BERT-family configs default to 0.1, ViT to 0.0
        self.hidden_dropout = default if hidden_dropout is None else hidden_dropout
        self.attention_dropout = default if attention_dropout is None else attention_dropout
        self.num_labels = self._num_labels()
        self.image_tokens, self.patch_inputs = self._vit_geometry()

    @classmethod
    def from_model(cls, model: Any) -> CostModel:
        """From a global ``transformers`` model (its config gives the dropout settings)."""
        adapter = adapter_for(model)
        config = model.config
        return cls(
            adapter,
            adapter.dims(config),
            {name: tuple(t.shape) for name, t in model.state_dict().items()},
            hidden_dropout=float(getattr(config, "hidden_dropout_prob", 0.0)) > 0,
            attention_dropout=float(getattr(config, "attention_probs_dropout_prob", 0.0)) > 0,
        )

    def _num_labels(self) -> int:
        for name, shape in self.shapes.items():
            if name.endswith(("classifier.weight", "classifier.out_proj.weight")):
                return int(shape[0])
        return 0

    def _vit_geometry(self) -> tuple[int | None, int]:
        """(tokens per image, inputs per patch) for ViT; (None, 0) otherwise."""
        if self.adapter.name != "vit":
            return None, 0
        pos = next((s for n, s in self.shapes.items() if n.endswith("embeddings.position_embeddings")), None)
        proj = next((s for n, s in self.shapes.items() if n.endswith("patch_embeddings.projection.weight")), None)
        if pos is None or proj is None:
            raise ValueError("a ViT cost model needs the position embeddings and the patch projection shapes")
        return int(pos[1]), math.prod(proj[1:])

    def plan(self, spec: ElasticSpec) -> SlicePlan:
        return slice_plan(self.adapter, self.dims, spec, self.shapes)

    def params(self, spec: ElasticSpec) -> int:
        """Exact parameter count of the sub-model (sum of its tensors' sizes)."""
        return sum(s.numel for s in self.plan(spec).values())

    def estimate(
        self, spec: ElasticSpec, *, batch_size: int, seq_len: int | None = None, wire_dtype: str = "float32"
    ) -> Costs:
        """Costs of training ``spec`` at ``batch_size`` sequences of ``seq_len`` tokens (ViT: fixed by the image)."""
        seq_len = self._seq_len(seq_len)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size is {batch_size!r}; it must be an integer >= 1")
        nbytes = dtype_bytes(wire_dtype)
        plan = self.plan(spec)
        params = sum(s.numel for s in plan.values())
        largest = max(s.numel for s in plan.values())
        w = _widths(spec)
        fwd = forward_flops(w, seq_len, num_labels=self.num_labels, patch_inputs=self.patch_inputs)
        pixels = (seq_len - 1) * self.patch_inputs if self.image_tokens else 0
        acts = activation_elements(
            w,
            batch_size=batch_size,
            seq_len=seq_len,
            arch=self.adapter.name,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            pixels=pixels,
        )
        peak = peak_train_bytes(
            params=params, largest=largest, activations=acts, tokens=batch_size * seq_len, hidden=w.hidden,
            max_ffn=max(w.f),
        )
        weights_mb = TRAIN_BYTES * params / MIB
        return Costs(
            params=params,
            wire_dtype=wire_dtype_name(wire_dtype),
            wire_bytes=params * nbytes,
            forward_flops_per_sample=fwd,
            flops_per_sample=3.0 * fwd,
            batch_size=batch_size,
            seq_len=seq_len,
            weights_mb=weights_mb,
            gradients_mb=weights_mb,
            optimizer_mb=2 * weights_mb,
            activations_mb=TRAIN_BYTES * acts / MIB,
            overhead_mb=OVERHEAD_MB,
            train_memory_mb=OVERHEAD_MB + peak / MIB,
            infer_memory_mb=OVERHEAD_MB + peak_infer_bytes(w, params=params, batch_size=batch_size, seq_len=seq_len) / MIB,
        )

    def _seq_len(self, seq_len: int | None) -> int:
        if self.image_tokens is not None:
            if seq_len not in (None, self.image_tokens):
                raise ValueError(f"seq_len is {seq_len}; this ViT always sees {self.image_tokens} tokens per image")
            return self.image_tokens
        if seq_len is None:
            raise ValueError("seq_len is required for a text model")
        if not isinstance(seq_len, int) or not 1 <= seq_len <= self.max_positions:
            raise ValueError(f"seq_len is {seq_len!r}; it must be an integer between 1 and {self.max_positions}")
        return seq_len

    @property
    def max_positions(self) -> int:
        pos = next((s for n, s in self.shapes.items() if n.endswith("position_embeddings.weight")), None)
        return int(pos[0]) if pos is not None else 1 << 20
