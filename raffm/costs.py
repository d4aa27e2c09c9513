"""Cost model of an elastic sub-model: parameters, bytes on the wire, FLOPs and peak training memory.

Everything is computed from the *global* model's tensor shapes and a spec (no model is built), so the extractor can
plan a fleet quickly. Parameter counts are exact: they are the sub-shapes of :func:`raffm.slicing.slice_plan`.

Peak training memory (fp32 weights, AdamW, one ``forward, backward, [nested cuts], step, zero_grad`` loop), in
bytes, for a :class:`~raffm.recipe.Recipe` that may freeze tensors and train nested cuts on shared weights::

    W = 4 * params                      all weights, frozen or not
    G = 4 * trained params              gradients; AdamW keeps 2 G more (exp_avg, exp_avg_sq); frozen tensors: none
    A = activations autograd saves      (below) for the device's spec; A' for its largest nested cut
    X = 4 * T * (max_ffn + hidden)      gradient temporaries at the start of backward, T = batch * seq tokens
    P = 4 * numel(largest trained tensor)   AdamW (single-tensor, the CPU default) builds 2 temporaries of each
    C = 8 MiB                           fixed: optimizer bookkeeping, masks, allocator pages
    train_memory = C + max(W + 2G + A + X,  W + 3G + 2P,  W + 3G + A' + X')
                           backward peak    step peak     a nested cut's backward (the spec's gradients alive)

From step 2 on AdamW state exists during backward, so ``W + 2G + A`` (weights, moments, activations) is live at the
end of forward; gradients only appear as activations are freed. The step peak dominates for small widths with the
full vocabulary trained, where the embedding matrix is the largest tensor; freezing it removes 3 of its 4 copies.

Activations ``A``: what autograd saves in torch 2.13 (CPU, ``attn_implementation="sdpa"``), counted with
``torch.autograd.graph.saved_tensors_hooks`` and matched exactly by this formula (test_costs checks it). With
``h`` the kept hidden width and, per layer, ``a = heads * head_dim``, ``f`` its FFN width and ``S = B * heads * L^2``
(all in fp32 elements, ``T = B * L``):

- BERT-family encoders (post-LN: BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT): embeddings ``2 T h + 2 T``
  (+``T h`` dropout mask; embeddings of a narrower width ``e`` projected into the layers, as ELECTRA-small's:
  ``2 T e + 2 T + T h``, +``T e``); per layer ``T (4h + 4a + 2f) + 4T`` (input, LayerNorm inputs/outputs; q, k, v,
  context; GELU input/output; LN statistics), plus ``2 T h`` dropout masks when hidden dropout > 0 (CPU dropout
  saves a float mask; DistilBERT, with dropout after its FFN only, ``T h``), plus ``3 S`` (softmax output, its
  dropout mask and the dropped probabilities: SDPA falls back to the math kernel with attention dropout) or
  ``B * heads * L`` (the log-sum-exp of the flash kernel) without attention dropout, plus the padding mask it keeps,
  ``B L^2``, for text.
- ViT (pre-LN): the same per-layer terms; embeddings keep the pixels ``B * 3 * H * W`` and the final LayerNorm
  ``2 T h``; ``L`` is the number of patches + 1, read from the position embeddings.
- DeBERTa-v2/v3 (post-LN, disentangled attention, always the eager kernel), with ``R`` the rows of the relative
  position embeddings: BERT's per-layer terms with ``S`` instead of the flash kernel's (the softmax output; ``3 S``
  with attention dropout), plus ``T a`` (the context copy), the raw content-to-position and position-to-content
  scores ``2 B heads L R``, the projected relative embeddings repeated over the batch ``2 B R a``, their dropout
  mask and output ``2 R h``, the boolean attention mask ``B L^2 / 4`` and the two gather indices ``4 L^2`` (int64);
  once, the LayerNorm of the relative embeddings (DeBERTa-v3): ``2 R``, and ``R h`` without dropout.
- Llama family (pre-RMSNorm, SwiGLU, grouped-query attention, no dropout), with ``a`` the query width (KV groups x
  query heads per group x head_dim) and ``c`` the key/value width (KV groups x head_dim): per layer
  ``T (6h + 2a + 2c + 4f) + 2T + B * heads * L`` (each RMSNorm keeps its input, 1/rms, the normalised input and its
  output; q, k, v, the attention output and the flash kernel's log-sum-exp; SwiGLU's gate, SiLU output, up and
  product); outside the layers the final RMSNorm ``3 T h + T``, cos/sin ``2 L head_dim``, the logits ``T V`` the loss
  keeps, and token ids and labels; Qwen3's RMSNorm on every query and key head adds its input, output and 1/rms,
  ``T (2a + 2c) + T (a + c) / head_dim``. This is an unpadded (packed or equal-length) batch: a padding mask makes SDPA
  repeat K/V to the query heads (``2 T (a - c)`` more per layer) and materialise the mask (``~B L^2``).
- OPT (pre-LN, biases, ReLU FFN of two matrices, learned positions, dropout after attention and after the FFN, none
  on the embeddings): the BERT family's per-layer terms with ``T f`` for the FFN instead of ``2 T f`` (ReLU saves
  only its output, which the second matrix saves as its input), padding mask included; outside the layers the final
  LayerNorm ``2 T h + 2 T`` (``T h + 2 T`` under a frozen head, which saves no input: a tied LM head with the
  vocabulary frozen), the int64 token and position ids ``4 T`` and the loss's normaliser; the causal LM adds
  the logits ``T V`` and its shifted labels ``2 T``, the sequence classifier (it scores every position and keeps
  the last non-padding one) ``B (labels + 6)``: the kept scores' log-softmax and int64 row, position and label
  indices. Both exact against autograd, cut or not, with and without dropout, with the vocabulary and first layer
  frozen or not; their FLOPs equal FlopCounterMode's (counted on eager attention: the counter misses SDPA's CPU
  kernel). A bare ``OPTModel`` is priced as the causal LM (its logits, which it never computes, included).
- Phi (one LayerNorm per layer feeding attention and a gelu_new FFN in parallel, biases, partial rotary embeddings,
  an untied LM head with a bias), with ``a``, ``c`` as for the Llama family: per layer
  ``T (2h + 3a + 2c + 5f) + 2T + B * heads * L`` (the LayerNorm's input, statistics and output; q, k, v, the
  attention output twice, as SDPA's output and its contiguous copy the output projection keeps, ``2a`` for a single
  head, whose copy is a view; the flash kernel's log-sum-exp; gelu_new, a composition of elementwise ops, saves 5
  tensors per neuron: its input, the tanh output, ``0.5 x``, ``1 + tanh`` and its output), plus ``2 T h`` residual
  dropout masks when ``resid_pdrop`` > 0 (Phi-2's 0.1); outside the layers OPT's terms with the int64 position ids
  replaced by the rotary cos and sin, ``2 L r`` for the ``r`` rotated dimensions of a head (``rotary_ndims``). Exact
  against autograd, cut or not, with the vocabulary and the first layer frozen or not, for the causal LM and the
  sequence classifier on an unpadded batch, as for the Llama family (a padding mask adds ``B L^2`` per layer, and
  K/V repeated to the query heads under GQA); FLOPs equal FlopCounterMode's (eager).
  Embedding and attention dropout (0.0 in every Phi checkpoint) are not priced.
- GPT-2 (pre-LN, biases, one fused q/k/v projection, gelu_new, learned positions, a head tied to the token embedding;
  dropout on the embeddings' sum, the attention probabilities and after attention and the FFN, all 0.1 by default):
  OPT's per-layer terms with ``5 T f`` for gelu_new (as Phi's), plus ``2 T a`` where the flash kernel runs: it keeps
  the fused projection's output ``3 T a`` and copies of the queries and values, ``2 T a``, besides its output (which
  the output projection keeps, a view), i.e. ``6 T a`` against the encoders' ``4 T a``; with attention dropout the
  math kernel keeps the scaled queries and keys, the values, the output projection's input and ``3 S``, the
  encoders' terms. Outside the layers OPT's, with the int64 position ids one row for the batch, ``2 L``, and the
  embedding dropout mask ``T h`` when ``embd_pdrop`` > 0; the padding mask ``B L^2`` per layer is priced, as OPT's.
  Exact against autograd (cut or not, a single head or several, every dropout on or off, the vocabulary and the
  first layer frozen or not) for the causal LM and the sequence classifier on a padded batch; an unpadded batch
  (no mask: SDPA runs causal) saves ``B L^2`` per layer less. FLOPs equal FlopCounterMode's (eager). Other activation
  functions than gelu_new (every GPT-2 checkpoint's) are priced as it.
- GPT-NeoX (pre-LN, biases, one q/k/v projection fused per head, partial rotary embeddings, an exact-GELU FFN, an LM
  head untied unless ``tie_word_embeddings``; ``hidden_dropout`` on the embeddings and after attention and the FFN,
  ``attention_dropout`` on the probabilities, both 0.0 by default): the encoders' per-layer terms (``2 T f`` for GELU,
  the padding mask ``B L^2``), plus ``T a`` where the flash kernel runs with more than one head: it keeps the rotated
  queries and keys, the values (a copy: the fused projection's output is not kept) and its output, and the output
  projection keeps a contiguous copy of that output (a view for a single head), i.e. ``5 T a`` against ``4 T a``;
  with attention dropout the math kernel keeps the encoders' terms. With ``use_parallel_residual`` (Pythia's) both
  LayerNorms read the layer input, kept once, and no residual sum sits between attention and the FFN: ``T h`` less
  per layer. Outside the layers OPT's terms with the token ids only, the rotary cos and sin ``2 L r`` (``r =
  rotary_pct * head_dim``) and the embedding dropout mask ``T h`` with hidden dropout. Exact against autograd
  (parallel or sequential, cut or not, a single head or several, every dropout on or off, a tied or untied head, the
  vocabulary and the first layer frozen or not) for the causal LM and the sequence classifier on a padded batch; an
  unpadded batch (no mask: SDPA runs causal) saves ``B L^2`` per layer less. FLOPs equal FlopCounterMode's (eager).
  Activation functions other than exact GELU (Pythia's) are priced as it.
- ModernBERT (pre-LN without biases by default, one fused q/k/v projection, rotary embeddings with one theta for the
  global layers and another for the sliding-window ones, a GELU GLU FFN, a prediction head and a classifier; dropout
  on the embeddings, the attention probabilities and output, inside the FFN and before the classifier, all 0.0 by
  default): per layer ``T (4h + 6a + 4f) + 4T + B * heads * L + B L^2`` (each LayerNorm's input and statistics,
  its output the next projection keeps; the flash kernel's rotated queries and keys, the fused projection's output
  ``3 T a`` that keeps the values, its log-sum-exp, its output copy for ``Wo`` and the padding or window mask; the
  GLU's fused input projection's output ``2 T f`` (GELU's input and the gate are views of it), GELU's output and the
  gated product), ``T h + 2 T`` less in layer 0 (no LayerNorm before its attention); with attention dropout the math
  kernel's ``4 T a + 3 S`` (``6 T a``: a single head's values are a view of the fused output) and the output
  dropout's mask ``T h`` instead; ``T f`` more with FFN dropout; the rotary cos and sin ``2 L head_dim`` once per
  attention type among the trained layers. Outside the layers: token ids and
  the embeddings' LayerNorm ``T h + 4 T`` (+``T h`` embedding dropout), the final LayerNorm ``T h + 2 T`` and what
  the pooling keeps (``cls``: the final output ``T h``, through the first-token view; ``mean``: the int64 mask and
  its row sums ``2 T + 2 B``, and the pooled ``B h``), the head's GELU input, LayerNorm and classifier input
  ``3 B h + 2 B`` (+``B h`` classifier dropout), the loss's log-softmax, int64 labels and normaliser. Exact against
  autograd (every dropout on or off, ``cls`` or ``mean`` pooling, cut or not, a single head or several, the
  vocabulary and the first layer frozen or not) for the sequence classifier on a padded batch; an unpadded batch
  (no mask for the global layers) saves ``B L^2`` less per global layer. FLOPs equal FlopCounterMode's (eager). A
  bare ``ModernBertModel`` is priced as the classifier (its head, which it lacks,
  included).

Measured against RSS (``raffm.memory``, glibc allocator configured by ``configure_allocator``): within 2% for
MiniLM at batch 16 x 64 tokens across hidden widths 96-384. Text batches are padded to their longest text only
(:func:`raffm.training.batches`), so ``seq_len`` is a bound: the costs are those of a batch of full-length texts.
MB means MiB (2**20 bytes) throughout.
FedProx (a frozen copy of the received weights and its proximal term) adds about 2 W; it is not included.

LoRA recipes (``recipe.lora_rank > 0``, :mod:`raffm.lora`): the trained tensors are the adapters (``r (out + in)``
per target weight of the slice), so ``G``, the moments, ``P`` and the upload are theirs; ``W`` adds them to the
frozen slice; the slice itself is ``cached_bytes`` (downloaded once per model version, never re-sent), so a round
moves ``wire_bytes - cached_bytes`` = the adapters down and ``upload_bytes`` = the adapters up. Activations add
``T r`` per target (``x A^T``, saved for ``B``'s gradient); every other saved tensor is still needed for ``A``'s
gradients or the input gradients when every linear layer is a target (the default). A causal LM's backward starts
in the log-softmax, with its saved output, its gradient and the logits' gradient alive (``X`` = ``T (2 V + h)``;
checkpointed, the larger of that and one layer's recomputed activations). Measured against RSS (``raffm.memory``,
LoRA on every linear layer, batch 8 x 64): SmolLM2-135M 1,529 predicted / 1,526 measured MiB (rank 16) and
885 / 891 checkpointed (rank 8); a tiny Llama with a 16 k vocabulary within 3% (test_memory_prediction). The
training loop drops the model's output before backward, or its logits (``T V``) would stay alive through it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from raffm.arch import Adapter, adapter_for, canonical_shapes
from raffm.lora import adapter_shapes, target_weight_names
from raffm.recipe import Recipe
from raffm.slicing import SlicePlan, slice_plan
from raffm.spec import ElasticSpec, ModelDims
from raffm.wire import itemsize, wire_dtype_name

MIB = 2**20
TRAIN_BYTES = 4  # fp32 training: weights, gradients, moments and activations
# What a training loop's first run allocates and keeps beyond the formula (BLAS buffers per shape, the loop's code
# paths): 4-9 MiB on an AMD EPYC after raffm.memory.warm_up_runtime, more on some CPUs. A device's first round pays
# it; a runtime that has trained before does not (raffm.memory.training_peak measures that steady state).
OVERHEAD_MB = 8.0


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
    trained_params: int  # params minus the recipe's frozen tensors: what has gradients, moments and a delta
    wire_dtype: str
    wire_bytes: int  # the slice down (every tensor of the sub-model; frozen ones at the recipe's download_dtypes)
    cached_bytes: int  # the recipe's frozen tensors in wire_bytes: a device that kept them skips their download
    upload_bytes: int  # its delta up (the trained tensors only)
    forward_flops_per_sample: float
    flops_per_sample: float  # training: each pass's forward, and its backward (2x; 3x checkpointed) above frozen layers
    batch_size: int
    seq_len: int
    weights_mb: float
    gradients_mb: float
    optimizer_mb: float
    activations_mb: float
    overhead_mb: float
    train_memory_mb: float  # predicted peak; see the module docstring
    infer_memory_mb: float  # predicted peak of a no-grad forward at the same batch and sequence length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Widths:
    """Per-layer kept widths of a spec: ``a`` = heads * head_dim, ``f`` = FFN neurons."""

    hidden: int
    heads: tuple[int, ...]  # query heads
    a: tuple[int, ...]  # query (and attention output) width
    f: tuple[int, ...]
    kv: tuple[int, ...]  # key/value width: ``a`` without grouped-query attention


def _widths(spec: ElasticSpec, group: int = 1) -> _Widths:
    """Kept widths; ``group`` query heads per KV group when the spec's heads count KV groups (GQA)."""
    return _Widths(
        hidden=spec.hidden,
        heads=tuple(l.heads * group for l in spec.layers),
        a=tuple(l.heads * group * l.head_dim for l in spec.layers),
        f=tuple(l.ffn for l in spec.layers),
        kv=tuple(l.heads * l.head_dim for l in spec.layers),
    )


def forward_flops(
    w: _Widths, seq_len: int, *, num_labels: int, patch_inputs: int = 0, ffn_matrices: int = 2,
    position_outputs: int = 0, embedding: int = 0, relative: int = 0, batch_size: int = 1,
) -> float:
    """Forward FLOPs of one sample of ``seq_len`` tokens (2 per multiply-add), in a batch of ``batch_size``.

    Per layer: Q and output projections ``2 L h a``, K and V ``2 L h c`` (``c = a`` without GQA), FFN
    ``ffn_matrices * L h f`` (2 matrices; SwiGLU: 3), attention scores and their product with V ``2 L^2 a``; then
    the pooler/head ``h^2 + h * labels``, or a head applied at every position ``L h * position_outputs`` (a causal
    LM's vocabulary; OPT's classifier scores every position with its labels and keeps the last); ViT's
    patch projection ``L h * patch_inputs``; ELECTRA-small's embedding projection ``L h * embedding``. DeBERTa's
    ``relative`` position embeddings (``R`` rows): their query and key projections ``2 R h a`` once per batch, and
    the content-to-position and position-to-content scores ``2 L R a``.
    """
    h, length = w.hidden, seq_len
    macs = sum(
        2 * length * h * (a + c) + ffn_matrices * length * h * f + 2 * length * length * a
        + (2 * length * relative * a + 2 * relative * h * a / batch_size if relative else 0)
        for a, c, f in zip(w.a, w.kv, w.f)
    )
    macs += length * h * position_outputs if position_outputs else h * h + h * num_labels
    macs += (length - 1) * h * patch_inputs + length * h * embedding
    return 2.0 * macs


def layer_activation_elements(
    w: _Widths, *, batch_size: int, seq_len: int, hidden_dropout: bool, attention_dropout: bool, layer_dropouts: int = 2,
    padded: bool = False, relative: int = 0, ffn_saves: int = 2,
) -> list[int]:
    """fp32 elements autograd saves in each transformer layer of one training forward (module docstring);
    ``layer_dropouts``: the hidden dropouts of a layer (DistilBERT has only the FFN's); ``padded``: a text batch,
    whose padding mask the flash kernel keeps in every layer; ``relative``: the rows of DeBERTa's relative position
    embeddings (0: not DeBERTa); ``ffn_saves``: FFN activations saved per neuron (GELU 2, ReLU 1: OPT)."""
    b, h, tokens = batch_size, w.hidden, batch_size * seq_len
    per_layer = []
    for heads, a, f in zip(w.heads, w.a, w.f):
        saved = tokens * (4 * h + 4 * a + ffn_saves * f) + 4 * tokens
        saved += layer_dropouts * tokens * h if hidden_dropout else 0
        scores = b * heads * seq_len * seq_len
        if relative:  # eager disentangled attention (module docstring)
            saved += tokens * a + scores * (3 if attention_dropout else 1) + scores // heads // 4 + 4 * seq_len**2
            saved += 2 * b * relative * (heads * seq_len + a) + (2 * relative * h if hidden_dropout else 0)
        elif attention_dropout:
            saved += 3 * scores
        else:
            saved += b * heads * seq_len + (b * seq_len * seq_len if padded else 0)
        per_layer.append(saved)
    return per_layer


def activation_elements(
    w: _Widths,
    *,
    batch_size: int,
    seq_len: int,
    arch: str,
    hidden_dropout: bool,
    attention_dropout: bool,
    pixels: int = 0,
    token_head: bool = False,
    layer_dropouts: int = 2,
    padded: bool = False,
    embedding: int = 0,
    relative: int = 0,
    relative_norm: bool = False,
    ffn_saves: int = 2,
) -> int:
    """fp32 elements autograd saves for one training forward (see the module docstring for the terms).

    ``token_head``: the classification head drops out the first token before its dense layer (RoBERTa's and
    ELECTRA's heads), so with hidden dropout it keeps that token (``B h``) and its mask instead of the last layer's
    output, which BERT's pooler keeps through its first-token view. ``embedding``: the width of embeddings narrower
    than the layers (ELECTRA-small), whose projection keeps its output too."""
    b, h, tokens = batch_size, w.hidden, batch_size * seq_len
    total = embedding_activation_elements(tokens, h, embedding, hidden_dropout) + b * pixels  # or ViT's final LN
    if hidden_dropout and token_head:
        total += 2 * b * h - tokens * h
    total += sum(layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len, hidden_dropout=hidden_dropout,
                                           attention_dropout=attention_dropout, layer_dropouts=layer_dropouts,
                                           padded=padded, relative=relative, ffn_saves=ffn_saves))
    total += 4 * b * h  # pooler / classification head on the first token
    if relative_norm:  # DeBERTa-v3's LayerNorm of the relative embeddings: statistics, and output without dropout
        total += 2 * relative + (0 if hidden_dropout else relative * h)
    if arch != "vit":
        total += 3 * tokens  # int64 input ids and token types (2 elements' worth each / 2)
    return total


def embedding_activation_elements(tokens: int, hidden: int, embedding: int, hidden_dropout: bool) -> int:
    """What a post-LN encoder's input embeddings save (module docstring): the LayerNorm's input, output and statistics
    and its dropout mask, at the embeddings' own width (``embedding``, 0: the layers'), plus the projection's output
    where they are narrower than the layers."""
    width = embedding or hidden
    return (3 if hidden_dropout else 2) * tokens * width + 2 * tokens + (tokens * hidden if embedding else 0)


def decoder_layer_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, qk_norm_dim: int = 0) -> list[int]:
    """fp32 elements autograd saves in each Llama-family layer of one training forward (module docstring);
    ``qk_norm_dim`` > 0: the RMSNorm over every query and key head's ``qk_norm_dim`` dimensions (Qwen3)."""
    tokens = batch_size * seq_len
    return [
        tokens * (6 * w.hidden + 2 * a + 2 * c + 4 * f) + 2 * tokens + batch_size * heads * seq_len
        + (tokens * (2 * a + 2 * c + (a + c) // qk_norm_dim) if qk_norm_dim else 0)
        for heads, a, c, f in zip(w.heads, w.a, w.kv, w.f)
    ]


def decoder_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, head_dim: int, vocab: int,
                                qk_norm: bool = False) -> int:
    """fp32 elements autograd saves for one Llama-family training forward with labels (module docstring)."""
    tokens = batch_size * seq_len
    total = sum(decoder_layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len,
                                                  qk_norm_dim=head_dim if qk_norm else 0))
    total += 3 * tokens * w.hidden + tokens  # final RMSNorm
    total += 2 * seq_len * head_dim  # rotary cos and sin, shared by the layers
    total += tokens * vocab  # the logits (the loss's log-softmax)
    total += 4 * tokens + 1  # int64 token ids and labels, the loss's normaliser
    return total


def phi_layer_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, ffn_saves: int,
                                  hidden_dropout: bool) -> list[int]:
    """fp32 elements autograd saves in each Phi layer of one training forward (module docstring): one LayerNorm feeds
    attention and the FFN in parallel; ``ffn_saves`` activations per FFN neuron (gelu_new: 5); ``hidden_dropout``:
    the residual dropout after each branch (``resid_pdrop`` > 0, as Phi-2's) saves their masks."""
    tokens = batch_size * seq_len
    return [  # the attention output is saved twice (by SDPA, and by the output projection as its contiguous copy)
        tokens * (2 * w.hidden + (3 if heads > 1 else 2) * a + 2 * c + ffn_saves * f) + 2 * tokens
        + batch_size * heads * seq_len + (2 * tokens * w.hidden if hidden_dropout else 0)
        for heads, a, c, f in zip(w.heads, w.a, w.kv, w.f)
    ]


def gpt2_layer_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, hidden_dropout: bool,
                                   attention_dropout: bool, ffn_saves: int) -> list[int]:
    """fp32 elements autograd saves in each GPT-2 layer of one training forward (module docstring): the encoders'
    terms with a padded batch's mask, and ``2 T a`` more where the flash kernel keeps the fused q/k/v output and
    copies of q and v."""
    layers = layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len, hidden_dropout=hidden_dropout,
                                       attention_dropout=attention_dropout, ffn_saves=ffn_saves, padded=True)
    fused = 0 if attention_dropout else 2 * batch_size * seq_len
    return [saved + fused * a for saved, a in zip(layers, w.a)]


def neox_layer_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, hidden_dropout: bool,
                                   attention_dropout: bool, parallel_residual: bool) -> list[int]:
    """fp32 elements autograd saves in each GPT-NeoX layer of one training forward (module docstring): the encoders'
    terms with a padded batch's mask, ``T a`` more where the flash kernel's output is copied for the output projection
    (several heads), and ``T h`` less with a parallel residual (one saved input for both LayerNorms, no residual sum
    between the branches)."""
    tokens = batch_size * seq_len
    layers = layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len, hidden_dropout=hidden_dropout,
                                       attention_dropout=attention_dropout, padded=True)
    shared = tokens * w.hidden if parallel_residual else 0
    return [saved + (tokens * a if heads > 1 and not attention_dropout else 0) - shared
            for saved, heads, a in zip(layers, w.heads, w.a)]


def modernbert_layer_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, ffn_dropout: bool,
                                         attention_dropout: bool, head_dim: int, layer_types: tuple[str, ...],
                                         trained_from: int = 0) -> list[int]:
    """fp32 elements autograd saves in each ModernBERT layer of one training forward (module docstring); the rotary
    cos and sin of each attention type (``layer_types``, by layer index) are counted in the first layer of that type
    from ``trained_from`` on (layers below it save nothing)."""
    b, h, tokens = batch_size, w.hidden, batch_size * seq_len
    seen: set[str] = set()
    per_layer = []
    for i, (heads, a, f) in enumerate(zip(w.heads, w.a, w.f)):
        saved = tokens * (4 * h + 4 * f) + 4 * tokens - (tokens * h + 2 * tokens if i == 0 else 0)
        if attention_dropout:  # the math kernel: scaled q, k, v and 3 S; the output dropout's mask
            saved += 4 * tokens * a + 3 * b * heads * seq_len * seq_len + tokens * h
            saved += 2 * tokens * a if heads == 1 else 0  # a single head's values: a view of the fused output
        else:
            saved += 6 * tokens * a + b * heads * seq_len + b * seq_len * seq_len
        saved += tokens * f if ffn_dropout else 0
        kind = layer_types[i] if i < len(layer_types) else ""
        if i >= trained_from and kind not in seen:
            seen.add(kind)
            saved += 2 * seq_len * head_dim
        per_layer.append(saved)
    return per_layer


def modernbert_outside_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, num_labels: int,
                                           pooling: str, head_dropout: bool) -> int:
    """fp32 elements a ModernBERT sequence classifier's training forward with labels saves above its layers (module
    docstring): the final LayerNorm, the pooling, the prediction head, the classifier and the loss."""
    b, h, tokens = batch_size, w.hidden, batch_size * seq_len
    total = tokens * h + 2 * tokens  # final LayerNorm: input and statistics
    total += tokens * h if pooling == "cls" else 2 * tokens + 2 * b + b * h  # what the head's dense layer reads
    total += 3 * b * h + 2 * b + (b * h if head_dropout else 0)  # GELU input, LayerNorm, the classifier's input
    return total + b * num_labels + 2 * b + 1  # log-softmax, int64 labels, the loss's normaliser


def outside_activation_elements(w: _Widths, *, batch_size: int, seq_len: int, vocab: int, num_labels: int,
                                inputs: int, head_trains: bool = True, rotary: int = 0) -> int:
    """fp32 elements an OPT, Phi, GPT-2 or GPT-NeoX training forward with labels saves outside its layers (module
    docstring): the causal LM's when ``vocab`` > 0, else the sequence classifier's; ``inputs``: what the input
    embeddings save (``CostModel._decoder_inputs``); ``head_trains``: the head's weight has a gradient (a frozen linear
    layer saves no input); ``rotary``: the rotated dimensions per head of the rotary cos and sin (Phi, GPT-NeoX)."""
    b, tokens = batch_size, batch_size * seq_len
    total = (2 if head_trains else 1) * tokens * w.hidden + 2 * tokens  # final LayerNorm: input, statistics, output
    total += inputs + 1 + 2 * seq_len * rotary  # the embeddings' ids (and masks), the loss's normaliser, cos and sin
    if vocab:
        return total + tokens * vocab + 2 * tokens  # the logits (the loss's log-softmax), the shifted int64 labels
    return total + b * (num_labels + 6)  # the kept scores' log-softmax; int64 row, position and label indices


@dataclass(frozen=True)
class Pass:
    """What one forward/backward pass of a (nested) spec adds on top of weights and optimizer state, in fp32
    elements: everything autograd saves, the largest layer's share of it, and the gradient temporaries at the start
    of backward (``T * (max_ffn + hidden)``); ``layer_params`` the most trained parameters of any one layer."""

    activations: int
    largest_layer: int
    outside_layers: int  # what the embeddings and the head save
    checkpoints: int  # layer inputs a checkpointed forward keeps instead: layers * T * hidden
    temporaries: int
    layer_params: int

    def backward_bytes(self, *, checkpointing: bool) -> int:
        """Plain: all activations and the temporaries. Checkpointed (measured on MiniLM): the layer inputs, one
        layer's recomputed activations, and what the embeddings and the head save."""
        if checkpointing:
            return TRAIN_BYTES * (self.checkpoints + max(self.largest_layer, self.temporaries) + self.outside_layers)
        return TRAIN_BYTES * (self.activations + self.temporaries)


def peak_train_bytes(
    *, weights: int, trained: int, largest: int, main: Pass, nested: Pass | None = None, checkpointing: bool = False,
    teacher: int = 0,
) -> int:
    """The peak of one training step in bytes (overhead excluded).

    ``weights``: bytes of all weights (frozen ones at their storage precision); ``trained``/``largest``: elements of
    all trained tensors and of the largest one (``G = 4 * trained``, and two AdamW moments as big). The peak is the
    largest of: the device spec's backward, ``W + 2G + A + X`` (its gradients appear as its activations are freed)
    or, checkpointed, ``W + 3G + checkpoints + layer``; the optimizer step, ``W + 3G + 2P``; and a nested cut's
    backward while the spec's gradients are alive, ``W + 3G + A' + X'`` (checkpointed: ``W + 3G + checkpoints' +
    layer' + X'`` plus one layer's gradients, which the cut accumulates into the spec's one layer at a time), plus
    the ``teacher`` elements the cut learns from (the spec's layer outputs when hidden states are distilled).
    """
    grads = TRAIN_BYTES * trained
    if checkpointing:
        backward = weights + 3 * grads + main.backward_bytes(checkpointing=True)
    else:
        backward = weights + 2 * grads + main.backward_bytes(checkpointing=False)
    step = weights + 3 * grads + 2 * TRAIN_BYTES * largest
    cut = 0
    if nested is not None:
        cut = weights + 3 * grads + nested.backward_bytes(checkpointing=checkpointing) + TRAIN_BYTES * teacher
        if checkpointing:
            cut += TRAIN_BYTES * (nested.temporaries + nested.layer_params)
    return max(backward, step, cut)


def peak_infer_bytes(w: _Widths, *, params: int, batch_size: int, seq_len: int, logits: int = 0) -> int:
    """A no-grad forward: weights plus :func:`forward_live_elements`."""
    return TRAIN_BYTES * (params + forward_live_elements(w, batch_size=batch_size, seq_len=seq_len, logits=logits))


def forward_live_elements(w: _Widths, *, batch_size: int, seq_len: int, logits: int = 0) -> int:
    """What a no-grad forward holds besides the weights, in fp32 elements: the widest layer's live tensors (residual,
    q/k/v, scores; or the FFN), and ``logits`` elements per token of a causal LM's output."""
    tokens = batch_size * seq_len
    live = max(
        max(3 * tokens * a + 3 * batch_size * heads * seq_len * seq_len, 2 * tokens * f)
        for heads, a, f in zip(w.heads, w.a, w.f)
    )
    return 3 * tokens * w.hidden + live + tokens * logits


def _hidden_dropout(config: Any) -> float:
    """The dropout after attention and the FFN: BERT's ``hidden_dropout_prob``, OPT's ``dropout``, Phi's and GPT-2's
    ``resid_pdrop``, GPT-NeoX's ``hidden_dropout`` (0 where the config has none: the Llama family)."""
    names = ("hidden_dropout_prob", "dropout", "resid_pdrop", "hidden_dropout")
    name = next((n for n in names if hasattr(config, n)), None)
    return float(getattr(config, name) or 0.0) if name else 0.0


class CostModel:
    """Costs of any spec of one global model, from its state-dict shapes.

    ``shapes``: global tensor name -> shape (``raffm.slicing.shapes_of(model.state_dict())``); ``hidden_dropout`` /
    ``attention_dropout`` / ``embedding_dropout``: whether training runs with dropout > 0 there (changes what autograd
    saves); ``embedding_dropout`` is GPT-2's on the embeddings' sum (``embd_pdrop``) or GPT-NeoX's on the token
    embeddings (default: as ``hidden_dropout``); ``parallel_residual``: GPT-NeoX's ``use_parallel_residual``;
    ``rotary_dims``: the dimensions of every head that rotary embeddings rotate (default: all of them). ModernBERT:
    ``hidden_dropout`` is its FFN's (``mlp_dropout``), ``head_dropout`` the classifier's (default: as
    ``hidden_dropout``), ``layer_types`` each layer's attention type (its own rotary cos and sin; empty: one type)
    and ``pooling`` its ``classifier_pooling``.
    """

    def __init__(
        self,
        adapter: Adapter,
        dims: ModelDims,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        hidden_dropout: bool | None = None,
        attention_dropout: bool | None = None,
        embedding_dropout: bool | None = None,
        parallel_residual: bool = False,
        rotary_dims: int | None = None,
        head_dropout: bool | None = None,
        layer_types: tuple[str, ...] = (),
        pooling: str = "cls",
    ) -> None:
        self.adapter = adapter
        self.dims = dims
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        default = adapter.post_ln  # BERT-family configs default to 0.1, ViT and Llama to 0.0
        self.hidden_dropout = default if hidden_dropout is None else hidden_dropout
        self.attention_dropout = default if attention_dropout is None else attention_dropout
        self.embedding_dropout = self.hidden_dropout if embedding_dropout is None else embedding_dropout
        self.parallel_residual = parallel_residual
        self.head_dropout = self.hidden_dropout if head_dropout is None else head_dropout
        self.layer_types = tuple(layer_types)
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling is {pooling!r}; it must be 'cls' or 'mean'")
        self.pooling = pooling
        self.rotary_dims = dims.head_dim if rotary_dims is None else rotary_dims
        self.num_labels = self._num_labels()
        self.token_head = any(n.endswith("classifier.out_proj.weight") for n in self.shapes)  # RoBERTa's, ELECTRA's
        self.embedding = self._embedding_width()
        # DeBERTa's relative position embeddings: every layer projects all their rows with its own query and key.
        self.relative = next((int(s[0]) for n, s in self.shapes.items() if n.endswith("rel_embeddings.weight")), 0)
        self.relative_norm = bool(self.relative) and any(n.endswith("encoder.LayerNorm.weight") for n in self.shapes)
        self.image_tokens, self.patch_inputs = self._vit_geometry()
        self.lm_vocab = self._lm_vocab()
        # A head applied at every position: a causal LM's, or a decoder classifier's (OPT keeps the last position's).
        self.position_outputs = self.lm_vocab or (self.num_labels if self.adapter.causal_lm else 0)
        # A causal LM whose canonical tensors have no LM head of their own: the head is the embedding (SmolLM2).
        self.tied_head = bool(self.lm_vocab and not any(n.endswith("lm_head.weight") for n in self.shapes))
        # Qwen3 normalises every query and key head (RMSNorm over its head_dim) before the rotary embedding.
        self.qk_norm = any(n.endswith("self_attn.q_norm.weight") for n in self.shapes)
        self._plans: dict[ElasticSpec, SlicePlan] = {}

    @classmethod
    def from_model(cls, model: Any) -> CostModel:
        """From a global ``transformers`` model (its config gives the dropout settings)."""
        adapter = adapter_for(model)
        config = model.config
        attention_dropout = next((getattr(config, n) for n in ("attention_probs_dropout_prob", "attention_dropout",
                                                               "attn_pdrop") if hasattr(config, n)), 0.0)
        dims = adapter.dims(config)
        rope = getattr(config, "rope_parameters", None) or {}
        if adapter.name == "modernbert":  # dropouts of its own names; rotary per attention type, over whole heads
            return cls(adapter, dims, canonical_shapes(model), hidden_dropout=float(config.mlp_dropout) > 0,
                       attention_dropout=float(config.attention_dropout) > 0,
                       embedding_dropout=float(config.embedding_dropout) > 0,
                       head_dropout=float(config.classifier_dropout) > 0, layer_types=tuple(config.layer_types),
                       pooling=str(config.classifier_pooling))
        return cls(
            adapter,
            dims,
            canonical_shapes(model),  # a tied LM head counts once
            hidden_dropout=_hidden_dropout(config) > 0,
            attention_dropout=float(attention_dropout or 0.0) > 0,
            # GPT-2's embd_pdrop; GPT-NeoX drops out its token embeddings with its hidden_dropout
            embedding_dropout=float(getattr(config, "embd_pdrop", _hidden_dropout(config)) or 0.0) > 0,
            parallel_residual=bool(getattr(config, "use_parallel_residual", False)),
            rotary_dims=int(dims.head_dim * rope.get("partial_rotary_factor", 1.0)),
        )

    def _num_labels(self) -> int:
        for name, shape in self.shapes.items():
            if name.endswith(("classifier.weight", "classifier.out_proj.weight")) or name == "score.weight":
                return int(shape[0])
        return 0

    def _embedding_width(self) -> int:
        """The width of input embeddings narrower than the layers, projected into them (ELECTRA-small); 0 otherwise."""
        return next((int(s[1]) for n, s in self.shapes.items() if n.endswith("embeddings_project.weight")), 0)

    def _lm_vocab(self) -> int:
        """The vocabulary a causal LM predicts at every position (0 for classifiers, a decoder's included)."""
        if not self.adapter.causal_lm or self.num_labels:
            return 0
        names = sorted(self.adapter.vocab_tensors(self.shapes))
        if not names:
            raise ValueError(f"a {self.adapter.name} cost model needs the shape of the token embedding")
        return int(self.shapes[names[0]][0])

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
        """The slice plan of ``spec``; computed once per spec (fitting a device estimates every rung of the ladder with
        every recipe), so the plan returned is shared: read it, do not modify it."""
        try:
            return self._plans[spec]
        except KeyError:
            plan = self._plans[spec] = slice_plan(self.adapter, self.dims, spec, self.shapes)
            return plan

    def params(self, spec: ElasticSpec) -> int:
        """Exact parameter count of the sub-model (sum of its tensors' sizes)."""
        return sum(s.numel for s in self.plan(spec).values())

    def estimate(
        self,
        spec: ElasticSpec,
        *,
        batch_size: int,
        seq_len: int | None = None,
        wire_dtype: str = "float32",
        recipe: Recipe | None = None,
    ) -> Costs:
        """Costs of training ``spec`` at ``batch_size`` sequences of ``seq_len`` tokens (ViT: fixed by the image),
        with ``recipe``'s frozen tensors and nested cuts (plain fine-tuning of every tensor by default)."""
        seq_len = self._seq_len(seq_len)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size is {batch_size!r}; it must be an integer >= 1")
        recipe = recipe or Recipe()
        nbytes = dtype_bytes(wire_dtype)
        plan = self.plan(spec)
        unknown = sorted(recipe.frozen - set(plan))
        if unknown:
            raise ValueError(f"the recipe freezes tensors the sub-model does not have: {unknown[:5]}")
        params = sum(s.numel for s in plan.values())
        trained_by_name = self._trained(plan, recipe)
        trained = list(trained_by_name.values())
        adapters = sum(trained) if recipe.lora_rank else 0  # added to the slice's weights, not part of it
        narrow = recipe.download_dtypes(plan, self.adapter.vocab_tensors(plan))
        wire = adapters * nbytes + sum(s.numel * dtype_bytes(narrow.get(n, wire_dtype)) for n, s in plan.items())
        stored = sum(plan[n].numel for n in self.adapter.vocab_tensors(recipe.frozen))  # at recipe.frozen_dtype
        weights = TRAIN_BYTES * (params + adapters - stored) + dtype_bytes(recipe.frozen_dtype) * stored
        w = _widths(spec, self.dims.group)
        fwd = self._forward_flops(w, seq_len, batch_size=batch_size)
        # Training: every pass's forward, and its backward (2x; 3x checkpointed: the forward again) above the frozen
        # layers. Per step: the spec, its smallest nested cut, and ``sampled`` of the others (their mean on average).
        frozen_layers = self.adapter.frozen_layers(trained_by_name, spec.depth)
        backward = 3.0 if recipe.checkpointing else 2.0

        def train_flops(c: _Widths) -> float:
            return (self._forward_flops(c, seq_len, batch_size=batch_size)
                    + backward * self._forward_flops(c, seq_len, above=frozen_layers, batch_size=batch_size))

        flops = train_flops(w)
        cuts = [_widths(cut, self.dims.group) for cut in recipe.nested]
        if cuts:
            others = [train_flops(c) for c in cuts[1:]]
            flops += train_flops(cuts[0])
            if others:
                flops += min(recipe.sampled, len(others)) * sum(others) / len(others)
        main = self._pass(spec, batch_size, seq_len, recipe, trained_by_name)
        passes: list[Pass | None] = [self._pass(cut, batch_size, seq_len, recipe, trained_by_name)
                                     for cut in recipe.nested]
        peak = max(
            peak_train_bytes(weights=weights, trained=sum(trained), largest=max(trained, default=0), main=main,
                             nested=cut, checkpointing=recipe.checkpointing,
                             teacher=(spec.depth + 1) * batch_size * seq_len * spec.hidden if recipe.distill_hidden else 0)
            for cut in passes or [None]
        )
        # The forward itself: where no layer trains (a probe round's head), its live tensors are the peak.
        live = forward_live_elements(w, batch_size=batch_size, seq_len=seq_len, logits=self.lm_vocab)
        peak = max(peak, weights + TRAIN_BYTES * (3 * sum(trained) + live))
        weights_mb = weights / MIB
        trained_mb = TRAIN_BYTES * sum(trained) / MIB
        return Costs(
            params=params,
            trained_params=sum(trained),
            wire_dtype=wire_dtype_name(wire_dtype),
            wire_bytes=wire,
            cached_bytes=wire - sum(trained) * nbytes,
            upload_bytes=sum(trained) * nbytes,
            forward_flops_per_sample=fwd,
            flops_per_sample=flops,
            batch_size=batch_size,
            seq_len=seq_len,
            weights_mb=weights_mb,
            gradients_mb=trained_mb,
            optimizer_mb=2 * trained_mb,
            activations_mb=TRAIN_BYTES * main.activations / MIB,
            overhead_mb=OVERHEAD_MB,
            train_memory_mb=OVERHEAD_MB + peak / MIB,
            infer_memory_mb=OVERHEAD_MB
            + peak_infer_bytes(w, params=params, batch_size=batch_size, seq_len=seq_len, logits=self.lm_vocab) / MIB,
        )

    def _forward_flops(self, w: _Widths, seq_len: int, *, above: int = 0, batch_size: int = 1) -> float:
        """Forward FLOPs per sample; ``above`` k: of the layers from k on and the head only (what a backward pass
        runs through when the input embeddings and the first k layers are frozen)."""
        if above:
            w = _Widths(w.hidden, w.heads[above:], w.a[above:], w.f[above:], w.kv[above:])
        return forward_flops(w, seq_len, num_labels=self.num_labels, patch_inputs=0 if above else self.patch_inputs,
                             ffn_matrices=self.adapter.ffn_matrices, position_outputs=self.position_outputs,
                             embedding=0 if above else self.embedding, relative=self.relative,
                             batch_size=batch_size)

    def _trained(self, plan: SlicePlan, recipe: Recipe) -> dict[str, int]:
        """Name -> elements of every trained tensor: the slice's unfrozen tensors, or a LoRA recipe's adapters."""
        if not recipe.lora_rank:
            return {name: s.numel for name, s in plan.items() if name not in recipe.frozen}
        targets = target_weight_names(plan, recipe.lora_targets)
        shapes = adapter_shapes({name: plan[name].sub_shape for name in targets}, recipe.lora_rank)
        return {name: math.prod(shape) for name, shape in shapes.items()}

    def _pass(self, spec: ElasticSpec, batch_size: int, seq_len: int, recipe: Recipe,
              trained: Mapping[str, int]) -> Pass:
        w = _widths(spec, self.dims.group)
        pixels = (seq_len - 1) * self.patch_inputs if self.image_tokens else 0
        hidden_dropout = self.hidden_dropout and recipe.dropout  # a recipe may switch dropout off (no masks saved)
        embedding_dropout = self.embedding_dropout and recipe.dropout
        options: dict[str, Any] = dict(batch_size=batch_size, seq_len=seq_len, hidden_dropout=hidden_dropout,
                                       attention_dropout=self.attention_dropout and recipe.dropout,
                                       layer_dropouts=self.adapter.layer_dropouts, padded=self.image_tokens is None,
                                       relative=self.relative, ffn_saves=self.adapter.ffn_saves)
        tokens = batch_size * seq_len
        plan = self.plan(spec)  # this pass's (maybe nested) cut: its own sizes of the trained tensors
        frozen_layers = self.adapter.frozen_layers(trained, spec.depth)
        if self.adapter.name in ("opt", "phi", "gpt2", "gpt_neox"):  # pre-LN layers with biases, a final LayerNorm
            if self.adapter.name == "opt":  # the encoders' layers (ReLU FFN)
                layers = layer_activation_elements(w, **options)
            elif self.adapter.name == "phi":
                layers = phi_layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len,
                                                       ffn_saves=self.adapter.ffn_saves, hidden_dropout=hidden_dropout)
            elif self.adapter.name == "gpt2":
                layers = gpt2_layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len,
                                                        hidden_dropout=hidden_dropout,
                                                        attention_dropout=options["attention_dropout"],
                                                        ffn_saves=self.adapter.ffn_saves)
            else:
                layers = neox_layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len,
                                                        hidden_dropout=hidden_dropout,
                                                        attention_dropout=options["attention_dropout"],
                                                        parallel_residual=self.parallel_residual)
            head = self.adapter.task_head(plan) or self.adapter.vocab_tensors(plan)  # a tied LM head: the embedding
            activations = sum(layers) + outside_activation_elements(
                w, batch_size=batch_size, seq_len=seq_len, vocab=self.lm_vocab, num_labels=self.num_labels,
                inputs=self._decoder_inputs(w, batch_size, seq_len, embedding_dropout),
                head_trains=not head.isdisjoint(trained), rotary=self.rotary_dims if self.adapter.rope else 0)
        elif self.adapter.name == "modernbert":
            layers = modernbert_layer_activation_elements(
                w, batch_size=batch_size, seq_len=seq_len, ffn_dropout=hidden_dropout,
                attention_dropout=options["attention_dropout"], head_dim=self.dims.head_dim,
                layer_types=self.layer_types, trained_from=frozen_layers)
            activations = sum(layers) + modernbert_outside_activation_elements(
                w, batch_size=batch_size, seq_len=seq_len, num_labels=self.num_labels, pooling=self.pooling,
                head_dropout=self.head_dropout and recipe.dropout)
            activations += self._embedding_activations(w, batch_size, seq_len, pixels, hidden_dropout,
                                                       embedding_dropout)
        elif self.adapter.causal_lm:
            layers = decoder_layer_activation_elements(w, batch_size=batch_size, seq_len=seq_len,
                                                       qk_norm_dim=self.dims.head_dim if self.qk_norm else 0)
            activations = decoder_activation_elements(w, batch_size=batch_size, seq_len=seq_len,
                                                      head_dim=self.dims.head_dim, vocab=self.lm_vocab,
                                                      qk_norm=self.qk_norm)
        else:
            layers = layer_activation_elements(w, **options)
            activations = activation_elements(w, arch=self.adapter.name, pixels=pixels, token_head=self.token_head,
                                              embedding=self.embedding, relative_norm=self.relative_norm, **options)
        if recipe.lora_rank:  # x A^T per target weight, saved for B's gradient
            per_layer = [0] * len(layers)
            for name in target_weight_names(plan, recipe.lora_targets):
                layer = self.adapter.layer_of(name)
                extra = tokens * recipe.lora_rank
                activations += extra
                if layer is not None:
                    per_layer[layer] += extra
            layers = [a + b for a, b in zip(layers, per_layer)]
        if frozen_layers:  # below the first trained layer nothing needs a gradient, so autograd saves nothing there
            below = self._embedding_activations(w, batch_size, seq_len, pixels, hidden_dropout, embedding_dropout)
            activations -= sum(layers[:frozen_layers]) + below
            layers = layers[frozen_layers:]
        by_layer: dict[int, int] = {}
        for name, numel in trained.items():
            layer = self.adapter.layer_of(name)
            if layer is not None and (recipe.lora_rank or name in plan):
                by_layer[layer] = by_layer.get(layer, 0) + (numel if recipe.lora_rank else plan[name].numel)
        return Pass(
            activations=activations,
            largest_layer=max(layers, default=0),
            outside_layers=activations - sum(layers),
            checkpoints=len(layers) * tokens * w.hidden,
            # a causal LM starts backward in the log-softmax, beside its saved output: its gradient and the logits'
            temporaries=tokens * (max(max(w.f), 2 * self.lm_vocab) + w.hidden),
            layer_params=max(by_layer.values(), default=0),
        )

    def _embedding_activations(self, w: _Widths, batch_size: int, seq_len: int, pixels: int,
                               hidden_dropout: bool, embedding_dropout: bool) -> int:
        """What the input embeddings save for their backward (module docstring): BERT's LayerNorm input, output and
        statistics, ViT's pixels; both a dropout mask with hidden dropout; ModernBERT's token ids and LayerNorm (its
        output is layer 0's). OPT's, Phi's, GPT-2's and GPT-NeoX's: see :meth:`_decoder_inputs`; a Llama's lookup
        saves only the token ids (counted with the labels)."""
        tokens = batch_size * seq_len
        if self.adapter.post_ln:
            return embedding_activation_elements(tokens, w.hidden, self.embedding, hidden_dropout)
        if self.adapter.name in ("opt", "phi", "gpt2", "gpt_neox"):
            return self._decoder_inputs(w, batch_size, seq_len, embedding_dropout)
        if self.adapter.name == "modernbert":  # int64 token ids; LayerNorm input and statistics; dropout mask
            return tokens * w.hidden + 4 * tokens + (tokens * w.hidden if embedding_dropout else 0)
        if self.adapter.name != "vit":
            return 0
        return (tokens * w.hidden if hidden_dropout else 0) + batch_size * pixels

    def _decoder_inputs(self, w: _Widths, batch_size: int, seq_len: int, embedding_dropout: bool) -> int:
        """What an OPT, Phi, GPT-2 or GPT-NeoX forward saves for its input embeddings' backward: the int64 token ids,
        OPT's int64 position ids (one per token), GPT-2's (one row for the batch) and GPT-2's and GPT-NeoX's embedding
        dropout mask."""
        tokens = batch_size * seq_len
        positions = {"opt": 2 * tokens, "gpt2": 2 * seq_len}.get(self.adapter.name, 0)
        mask = tokens * w.hidden if embedding_dropout and self.adapter.name in ("gpt2", "gpt_neox") else 0
        return 2 * tokens + positions + mask

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
        learned = ("position_embeddings.weight", "wpe.weight")  # BERT's, ViT's; GPT-2's
        pos = next((s for n, s in self.shapes.items() if n.endswith(learned)), None)
        if pos is None:  # OPT's learned positions start at row 2 of their table
            pos = next(((s[0] - 2, s[1]) for n, s in self.shapes.items() if n.endswith("embed_positions.weight")), None)
        return int(pos[0]) if pos is not None else 1 << 20
