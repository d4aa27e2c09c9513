"""Architecture adapters: which tensor axes are coupled, declared once per architecture.

Every parameter of a supported model is described by a *layout*: one :class:`Axis` per tensor axis saying what that
axis indexes. Salience ordering permutes every axis of the same kind (and layer) together; slicing keeps a leading
block of it. Adding an architecture is adding one :class:`Adapter` with its table of rules.

Axis kinds:
- ``hidden``: the residual-stream width, shared by the whole model;
- ``qk``: the query/key output rows of one layer, viewed as ``[heads, head_dim]``;
- ``v``: the value rows of one layer and the matching input columns of the attention output, ``[heads, head_dim]``;
- ``qkv``: one fused projection's query, key and value outputs, ``[3, heads, head_dim]`` (GPT-2's ``c_attn``): a cut
  keeps the same leading heads in each of the three parts;
- ``hqkv``: one fused projection whose outputs are grouped per head, ``[heads, 3, head_dim]`` (GPT-NeoX's
  ``query_key_value``): a head's query, key and value rows are one contiguous block, so a cut keeps leading blocks;
- ``q``: with grouped-query attention, the query rows of one layer and the matching input columns of the attention
  output, ``[kv_heads, group, head_dim]``: the query heads of KV head ``j`` are ``j*group ... (j+1)*group - 1``
  (how ``transformers``' ``repeat_kv`` pairs them), so a KV group and its query heads move and are cut together;
- ``kv``: with grouped-query attention, the key and value rows of one layer, ``[kv_heads, head_dim]``;
- ``ffn``: the feed-forward neurons of one layer (W_in rows, b_in, W_out columns; SwiGLU: gate and up rows, down
  columns);
- ``gffn``: one fused gated-FFN input projection's rows, ``[2, ffn]`` (ModernBERT's ``Wi``: ``input, gate =
  Wi(x).chunk(2)``): a cut keeps the same leading neurons in both halves;
- ``full``: anything never sliced (vocabulary, positions, labels, image channels, patch pixels, the width of
  embeddings narrower than the layers, as ELECTRA-small's).

Decoder LLMs (Llama, Qwen2, Qwen3, Mistral, Gemma, SmolLM3, Granite): their ``heads`` are KV groups and their head
dimensions are never permuted or cut (rotary position embeddings rotate fixed pairs of dimensions at fixed frequencies;
tests/unit/test_llama_adapter.py shows a within-head permutation changing the logits). Tied embeddings: the LM head is
the same parameter as the input embedding, so a tied model's canonical tensors (:func:`canonical_shapes`) hold it once,
under the embedding's name; the sub-model re-ties its head on load.

OPT decoders: plain multi-head attention with learned positions (BERT's ``qk``/``v`` axes). OPT multiplies the queries
by the *global* ``head_dim ** -0.5``, fixed when the attention module is built, so a sub-model that keeps fewer head
dimensions keeps the global scaling, as :mod:`raffm.elastic` does for every family: head dimensions are permuted and
cut like BERT's. OPT-350m's layout (embeddings narrower than the layers, projected in and out; post-LN layers) is
refused.

Phi decoders (Phi-1, Phi-1.5, Phi-2): the Llama family's axes (``q``/``kv``, KV groups of one query head each unless
``num_key_value_heads`` says otherwise) with biases everywhere, one LayerNorm per layer feeding attention and a GELU
FFN in parallel, and *partial* rotary embeddings: only the first ``rotary_ndims`` dimensions of every head rotate, so,
as with full rotary, dimensions inside a head are never permuted or cut. Per-head LayerNorms on queries and keys
(``qk_layernorm``, normalising over ``hidden_size // num_attention_heads``, which a hidden cut would change) are
refused.

GPT-2 (GPT2LMHeadModel, GPT2Model, GPT2ForSequenceClassification): pre-LN layers with biases, learned positions, a
gelu_new FFN, an LM head tied to the token embedding, and transformers' ``Conv1D`` projections, whose weights are
stored ``[in, out]`` (``y = x W + b``): its rules name the axes in that stored order. Queries, keys and values come
from one fused ``c_attn`` (the ``qkv`` axis); the attention output ``c_proj`` takes the ``v`` axis on its input rows.
Whole heads only (``fixed_head_dim``): the three parts of ``c_attn`` would need one within-head permutation each, and
GPT2Attention splits ``c_attn``'s output by ``split_size`` and views it per ``head_dim``, both patched per layer by
:mod:`raffm.elastic` (the scaling stays the global head's). Cross-attention layers (``add_cross_attention``) and the
eager-only ``reorder_and_upcast_attn`` (other saved tensors) are refused.

GPT-NeoX (Pythia; GPTNeoXForCausalLM, GPTNeoXModel, GPTNeoXForSequenceClassification): pre-LN layers with biases, an
exact-GELU FFN, an LM head (``lm_head``, which transformers renames from checkpoints' ``embed_out`` on load; untied
unless ``tie_word_embeddings``, then held once, as a tied Llama's) and *partial* rotary embeddings (``rotary_pct``,
``partial_rotary_factor`` in ``rope_parameters``), so whole heads only, as Phi's. Queries, keys and
values come from one fused ``query_key_value`` whose rows are grouped per head (the ``hqkv`` axis); the attention
output ``dense`` takes the ``v`` axis on its input columns. GPTNeoXAttention infers the head count from its input
(``view(..., -1, 3 * head_size)``) and scales by the global ``head_size``, so only the head size is patched per
layer (unchanged). Both residual layouts are supported: ``use_parallel_residual`` (Pythia's: attention and FFN each
read their own LayerNorm of the layer input) and sequential.

ModernBERT (ModernBertModel, ModernBertForSequenceClassification): a pre-LN encoder without biases (unless
``attention_bias``/``mlp_bias``/``norm_bias``/``classifier_bias``), rotary embeddings in every layer (another theta
for the sliding-window layers), so whole heads only. Queries, keys and values come from one fused ``nn.Linear``
``Wqkv`` whose output rows are GPT-2's ``[3, heads, head_dim]`` (the ``qkv`` axis, on rows here); ``attn.Wo`` takes
the ``v`` axis on its input columns. The FFN is a GLU whose ``Wi`` rows are ``[input | gate]`` (the ``gffn`` axis)
and ``mlp.Wo`` takes the ``ffn`` axis. ModernBertAttention infers the head count from its input (``view(..., 3, -1,
head_dim)``) and the MLP its width (``chunk(2)``), so nothing but the (unchanged) head size is patched per layer; a
depth cut keeps each kept layer's attention type (it is read by layer index from the global config). The prediction
``head`` (dense, norm) comes pretrained with the masked-LM checkpoints, so it counts as body: the task head is the
``classifier``. The masked LM and the flash-attention path (it unpads batches, which changes what a step keeps) are
not supported.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from collections.abc import Iterable
from typing import Any, Literal, cast

from torch import nn

from raffm.spec import ModelDims

AxisKind = Literal["hidden", "qk", "v", "q", "kv", "qkv", "hqkv", "ffn", "gffn", "full"]
HEAD_KINDS: tuple[AxisKind, ...] = ("qk", "v", "q", "kv", "qkv", "hqkv")
# Axes made of parts, each [heads, head_dim] (head axes) or [ffn] (FFN axes); 1 part otherwise.
FUSED_PARTS: dict[AxisKind, int] = {"qkv": 3, "gffn": 2}
FFN_KINDS: tuple[AxisKind, ...] = ("ffn", "gffn")
# Head axes whose every head holds parts, [heads, parts, head_dim]: a head's block is contiguous, so SPP moves it as
# one unit of a single part (FUSED_PARTS does not list them).
HEAD_PARTS: dict[AxisKind, int] = {"hqkv": 3}
_LAYER_KINDS: tuple[AxisKind, ...] = (*HEAD_KINDS, *FFN_KINDS)


@dataclass(frozen=True)
class Axis:
    kind: AxisKind
    layer: int | None = None  # set for head and ffn axes


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    kinds: tuple[AxisKind, ...]


def _rules(table: list[tuple[str, tuple[AxisKind, ...]]]) -> tuple[Rule, ...]:
    return tuple(Rule(re.compile(p), kinds) for p, kinds in table)


@dataclass(frozen=True)
class Adapter:
    """How one architecture family maps onto elastic axes.

    ``layer_pattern`` captures the layer index of per-layer tensors; ``layers_attr`` is the dotted path (below the
    base model) of the ``nn.ModuleList`` of layers; ``attention_attrs`` names the attention module (relative to a
    layer) and its head-size attribute, patched when a sub-model keeps fewer head dimensions; ``heads_attr`` the
    attention module's head-count attribute (None where ``forward`` infers it from the weights).

    ``grouped``: heads are KV groups (``q``/``kv`` axes; dims read ``num_key_value_heads``); ``rope``: rotary
    position embeddings, so SPP never permutes dimensions inside a head and specs keep every head dimension.
    ``causal_lm``: a decoder family, trained as a causal LM unless a job says otherwise; its LM predicts the vocabulary
    at every position (cost model).
    """

    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    layer_pattern: re.Pattern[str]
    layers_attr: str
    attention_module: str
    head_dim_attr: str
    # Vocabulary-sized embedding tensors (the strategy may freeze them: on MiniLM they are half the parameters).
    vocab_embeddings: re.Pattern[str] | None = None
    heads_attr: str | None = "num_attention_heads"
    ffn_attr: str = "intermediate_size"  # the config attribute of the FFN width (GPT-2's n_inner: None = 4 x hidden)
    # What marks an input embedding's module (GPT-2's are ``wte`` and ``wpe``): see :meth:`below`.
    input_embeddings: re.Pattern[str] = re.compile(r"embed")
    # Post-LN encoders (BERT, DistilBERT): LayerNormed input embeddings, and dropout by default (cost model).
    post_ln: bool = False
    layer_dropouts: int = 2  # hidden dropouts per layer (after attention and after the FFN; DistilBERT: the FFN only)
    ffn_matrices: int = 2  # weight matrices of the FFN (SwiGLU: gate, up and down): its FLOPs
    ffn_saves: int = 2  # FFN activations autograd saves per neuron (GELU: its input and output; ReLU: its output)
    grouped: bool = False
    rope: bool = False
    fixed_head_dim: bool = False  # specs keep every head dimension (always with rope)
    causal_lm: bool = False
    # Modules outside the layers' module that come pretrained with it (ModernBERT's prediction ``head``): not task head.
    body_modules: tuple[str, ...] = ()
    # Tensor name -> its axes (None: unknown) and its layer: they never change, and fitting one device asks for them
    # thousands of times (the aggregator does it while a round's devices poll).
    _layouts: dict[str, tuple[Axis, ...] | None] = field(default_factory=dict, init=False, repr=False, compare=False)
    _layers: dict[str, int | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    def dims(self, config: Any) -> ModelDims:
        heads = int(config.num_attention_heads)
        if not self.grouped:
            return ModelDims(
                hidden=int(config.hidden_size),
                layers=int(config.num_hidden_layers),
                heads=heads,
                head_dim=int(config.hidden_size) // heads,
                ffn=int(getattr(config, self.ffn_attr) or 4 * int(config.hidden_size)),
                fixed_head_dim=self.rope or self.fixed_head_dim,
            )
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        if heads % kv_heads:
            raise ValueError(f"{heads} attention heads do not split into {kv_heads} key/value heads")
        return ModelDims(
            hidden=int(config.hidden_size),
            layers=int(config.num_hidden_layers),
            heads=kv_heads,
            head_dim=int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads),
            ffn=int(config.intermediate_size),
            group=heads // kv_heads,
            fixed_head_dim=self.rope,
        )

    def layout(self, name: str) -> tuple[Axis, ...]:
        """The axes of parameter ``name``; ``ValueError`` for a tensor this adapter does not know."""
        try:
            axes = self._layouts[name]
        except KeyError:
            axes = self._layouts[name] = self._match(name)
        if axes is None:
            raise ValueError(f"{self.name} adapter does not know tensor {name!r}; add a rule for it in raffm/arch.py")
        return axes

    def _match(self, name: str) -> tuple[Axis, ...] | None:
        layer = self.layer_of(name)
        for rule in self.rules:
            if rule.pattern.search(name):
                return tuple(Axis(k, layer if k in _LAYER_KINDS else None) for k in rule.kinds)
        return None

    def vocab_tensors(self, names: Iterable[str]) -> frozenset[str]:
        """The vocabulary embedding tensors among ``names`` (none for architectures without a vocabulary)."""
        pattern = self.vocab_embeddings
        return frozenset(n for n in names if pattern is not None and pattern.search(n))

    def layer_of(self, name: str) -> int | None:
        try:
            return self._layers[name]
        except KeyError:
            match = self.layer_pattern.search(name)
            layer = self._layers[name] = int(match.group(1)) if match else None
            return layer

    def below(self, name: str, layers: int) -> bool:
        """Whether ``name`` feeds the first ``layers`` layers only: a tensor of one of them, or an input embedding."""
        layer = self.layer_of(name)
        if layer is not None:
            return layer < layers
        return layers > 0 and self.input_embeddings.search(name.rpartition(".")[0]) is not None

    def task_head(self, names: Iterable[str]) -> frozenset[str]:
        """The task head among ``names``: the tensors outside the module that holds the layers, i.e. what a task model
        adds on top of its pretrained body (BERT's and ViT's ``classifier``, RoBERTa's classification head). Empty for
        a bare body, whose layers are not inside a module of their own."""
        names = list(names)
        bodies = set()
        for name in names:
            match = self.layer_pattern.search(name)
            if match and match.start() > 0:
                bodies.add(name.split(".", 1)[0])
        if not bodies:
            return frozenset()
        bodies.update(self.body_modules)
        return frozenset(n for n in names if n.split(".", 1)[0] not in bodies)

    def frozen_layers(self, trained: Iterable[str], depth: int) -> int:
        """How many of a model's ``depth`` leading layers no gradient reaches when the tensors ``trained`` are
        (adapters included): those below the first layer with a trained tensor (all of them when only a task head
        trains), if no input embedding is trained (0 otherwise). Autograd saves nothing there and the backward pass
        stops above them."""
        layers = []
        for name in trained:
            layer = self.layer_of(name)
            if layer is not None:
                layers.append(layer)
            elif self.below(name, 1):
                return 0
        return min(layers, default=depth)


_BERT_RULES: list[tuple[str, tuple[AxisKind, ...]]] = [
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", ("full", "hidden")),
    (r"attention\.self\.(query|key)\.weight$", ("qk", "hidden")),
    (r"attention\.self\.(query|key)\.bias$", ("qk",)),
    (r"attention\.self\.value\.weight$", ("v", "hidden")),
    (r"attention\.self\.value\.bias$", ("v",)),
    (r"attention\.output\.dense\.weight$", ("hidden", "v")),
    (r"intermediate\.dense\.weight$", ("ffn", "hidden")),
    (r"intermediate\.dense\.bias$", ("ffn",)),
    (r"layer\.\d+\.output\.dense\.weight$", ("hidden", "ffn")),
    (r"(pooler|classifier)\.dense\.weight$", ("hidden", "hidden")),  # BERT pooler, RoBERTa head
    (r"(classifier|classifier\.out_proj)\.weight$", ("full", "hidden")),
    (r"(classifier|classifier\.out_proj)\.bias$", ("full",)),
    (r"(LayerNorm\.(weight|bias)|dense\.bias)$", ("hidden",)),
]

BERT = Adapter(
    name="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra",
                 "raffm_bert", "raffm_roberta", "raffm_xlm-roberta", "raffm_camembert", "raffm_electra"),
    rules=_rules(_BERT_RULES),
    layer_pattern=re.compile(r"encoder\.layer\.(\d+)\."),
    layers_attr="encoder.layer",
    attention_module="attention.self",
    head_dim_attr="attention_head_size",
    vocab_embeddings=re.compile(r"embeddings\.word_embeddings\.weight$"),
    post_ln=True,
)

# ELECTRA-small's embeddings are narrower than its layers (embedding_size < hidden_size) and a projection maps them
# into the residual stream: their width is then an axis of its own, never permuted or cut ("full").
FACTORIZED_BERT = replace(BERT, rules=_rules([
    (r"embeddings\.(word|position|token_type)_embeddings\.weight$", ("full", "full")),
    (r"embeddings\.LayerNorm\.(weight|bias)$", ("full",)),
    (r"embeddings_project\.weight$", ("hidden", "full")),
    (r"embeddings_project\.bias$", ("hidden",)),
    *_BERT_RULES,
]))

DISTILBERT = Adapter(
    name="distilbert",
    model_types=("distilbert", "raffm_distilbert"),
    rules=_rules(
        [
            (r"embeddings\.(word|position)_embeddings\.weight$", ("full", "hidden")),
            (r"attention\.(q_lin|k_lin)\.weight$", ("qk", "hidden")),
            (r"attention\.(q_lin|k_lin)\.bias$", ("qk",)),
            (r"attention\.v_lin\.weight$", ("v", "hidden")),
            (r"attention\.v_lin\.bias$", ("v",)),
            (r"attention\.out_lin\.weight$", ("hidden", "v")),
            (r"ffn\.lin1\.weight$", ("ffn", "hidden")),
            (r"ffn\.lin1\.bias$", ("ffn",)),
            (r"ffn\.lin2\.weight$", ("hidden", "ffn")),
            (r"^pre_classifier\.weight$", ("hidden", "hidden")),
            (r"^classifier\.weight$", ("full", "hidden")),
            (r"^classifier\.bias$", ("full",)),
            (r"(LayerNorm|layer_norm)\.(weight|bias)$|(out_lin|lin2|pre_classifier)\.bias$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"transformer\.layer\.(\d+)\."),
    layers_attr="transformer.layer",
    attention_module="attention",
    head_dim_attr="attention_head_size",
    vocab_embeddings=re.compile(r"embeddings\.word_embeddings\.weight$"),
    heads_attr="n_heads",
    ffn_attr="hidden_dim",
    post_ln=True,
    layer_dropouts=1,
)

# DeBERTa-v2/v3: BERT's post-LN layer with disentangled attention. Every layer projects the shared relative-position
# embeddings with its own query/key projections (or pos_query/pos_key ones), so they are cut and permuted with that
# layer's heads; the attention scale is computed from the kept head size, so specs keep every head dimension.
DEBERTA = replace(
    BERT,
    name="deberta-v2",
    model_types=("deberta-v2", "raffm_deberta-v2"),
    rules=_rules([
        (r"encoder\.rel_embeddings\.weight$", ("full", "hidden")),
        (r"attention\.self\.(query_proj|key_proj|pos_query_proj|pos_key_proj)\.weight$", ("qk", "hidden")),
        (r"attention\.self\.(query_proj|key_proj|pos_query_proj|pos_key_proj)\.bias$", ("qk",)),
        (r"attention\.self\.value_proj\.weight$", ("v", "hidden")),
        (r"attention\.self\.value_proj\.bias$", ("v",)),
        *_BERT_RULES,
    ]),
    fixed_head_dim=True,
)

VIT = Adapter(
    name="vit",
    model_types=("vit", "raffm_vit"),
    rules=_rules(
        [
            (r"embeddings\.(cls_token|mask_token|position_embeddings)$", ("full", "full", "hidden")),
            (r"patch_embeddings\.projection\.weight$", ("hidden", "full", "full", "full")),
            (r"attention\.(q_proj|k_proj)\.weight$", ("qk", "hidden")),
            (r"attention\.(q_proj|k_proj)\.bias$", ("qk",)),
            (r"attention\.v_proj\.weight$", ("v", "hidden")),
            (r"attention\.v_proj\.bias$", ("v",)),
            (r"attention\.o_proj\.weight$", ("hidden", "v")),
            (r"mlp\.fc1\.weight$", ("ffn", "hidden")),
            (r"mlp\.fc1\.bias$", ("ffn",)),
            (r"mlp\.fc2\.weight$", ("hidden", "ffn")),
            (r"pooler\.dense\.weight$", ("hidden", "hidden")),
            (r"^classifier\.weight$", ("full", "hidden")),
            (r"^classifier\.bias$", ("full",)),
            (r"(layernorm\w*\.(weight|bias)|projection\.bias|o_proj\.bias|fc2\.bias|pooler\.dense\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"layers\.(\d+)\."),
    layers_attr="layers",
    attention_module="attention",
    head_dim_attr="head_dim",
)

# Llama and the decoders that share its layout: Qwen2 adds q/k/v biases, Qwen3 an RMSNorm over every query and key
# head (one weight of head_dim, shared by the heads), Mistral and Gemma an explicit head_dim (Gemma a GELU gate and
# scaled embeddings), SmolLM3 layers without rotary embeddings, Granite scalar multipliers.
LLAMA = Adapter(
    name="llama",
    model_types=("llama", "qwen2", "qwen3", "mistral", "gemma", "smollm3", "granite", "raffm_llama", "raffm_qwen2",
                 "raffm_qwen3", "raffm_mistral", "raffm_gemma", "raffm_smollm3", "raffm_granite"),
    rules=_rules(
        [
            (r"embed_tokens\.weight$", ("full", "hidden")),
            (r"^lm_head\.weight$", ("full", "hidden")),
            (r"self_attn\.q_proj\.weight$", ("q", "hidden")),
            (r"self_attn\.q_proj\.bias$", ("q",)),
            (r"self_attn\.(k_proj|v_proj)\.weight$", ("kv", "hidden")),
            (r"self_attn\.(k_proj|v_proj)\.bias$", ("kv",)),
            (r"self_attn\.o_proj\.weight$", ("hidden", "q")),
            (r"self_attn\.(q_norm|k_norm)\.weight$", ("full",)),
            (r"mlp\.(gate_proj|up_proj)\.weight$", ("ffn", "hidden")),
            (r"mlp\.(gate_proj|up_proj)\.bias$", ("ffn",)),
            (r"mlp\.down_proj\.weight$", ("hidden", "ffn")),
            (r"(layernorm\.weight|norm\.weight|o_proj\.bias|down_proj\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"layers\.(\d+)\."),
    layers_attr="layers",
    attention_module="self_attn",
    head_dim_attr="head_dim",
    vocab_embeddings=re.compile(r"embed_tokens\.weight$"),
    heads_attr=None,  # LlamaAttention reshapes to (-1, head_dim): cutting whole KV groups keeps num_key_value_groups
    ffn_matrices=3,
    grouped=True,
    rope=True,
    causal_lm=True,
)

OPT = Adapter(
    name="opt",
    model_types=("opt", "raffm_opt"),
    rules=_rules(
        [
            (r"decoder\.(embed_tokens|embed_positions)\.weight$", ("full", "hidden")),
            (r"^lm_head\.weight$", ("full", "hidden")),
            (r"^score\.weight$", ("full", "hidden")),  # OPTForSequenceClassification scores every position
            (r"self_attn\.(q_proj|k_proj)\.weight$", ("qk", "hidden")),
            (r"self_attn\.(q_proj|k_proj)\.bias$", ("qk",)),
            (r"self_attn\.v_proj\.weight$", ("v", "hidden")),
            (r"self_attn\.v_proj\.bias$", ("v",)),
            (r"self_attn\.out_proj\.weight$", ("hidden", "v")),
            (r"fc1\.weight$", ("ffn", "hidden")),
            (r"fc1\.bias$", ("ffn",)),
            (r"fc2\.weight$", ("hidden", "ffn")),
            (r"(layer_norm\.(weight|bias)|out_proj\.bias|fc2\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"layers\.(\d+)\."),
    layers_attr="decoder.layers",
    attention_module="self_attn",
    head_dim_attr="head_dim",
    vocab_embeddings=re.compile(r"embed_tokens\.weight$"),
    heads_attr="num_heads",
    ffn_attr="ffn_dim",
    ffn_saves=1,  # ReLU, every OPT checkpoint's activation_function
    causal_lm=True,
)

PHI = Adapter(
    name="phi",
    model_types=("phi", "raffm_phi"),
    rules=_rules(
        [
            (r"embed_tokens\.weight$", ("full", "hidden")),
            (r"^(lm_head|score)\.weight$", ("full", "hidden")),  # PhiForSequenceClassification scores every position
            (r"^lm_head\.bias$", ("full",)),
            (r"self_attn\.q_proj\.weight$", ("q", "hidden")),
            (r"self_attn\.q_proj\.bias$", ("q",)),
            (r"self_attn\.(k_proj|v_proj)\.weight$", ("kv", "hidden")),
            (r"self_attn\.(k_proj|v_proj)\.bias$", ("kv",)),
            (r"self_attn\.dense\.weight$", ("hidden", "q")),
            (r"mlp\.fc1\.weight$", ("ffn", "hidden")),
            (r"mlp\.fc1\.bias$", ("ffn",)),
            (r"mlp\.fc2\.weight$", ("hidden", "ffn")),
            (r"(layernorm\.(weight|bias)|dense\.bias|fc2\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"layers\.(\d+)\."),
    layers_attr="layers",
    attention_module="self_attn",
    head_dim_attr="head_dim",
    vocab_embeddings=re.compile(r"embed_tokens\.weight$"),
    heads_attr=None,  # PhiAttention reshapes to (-1, head_dim), like Llama's
    ffn_saves=5,  # gelu_new: its input, tanh output, 0.5 x, 1 + tanh and output
    grouped=True,
    rope=True,
    causal_lm=True,
)

GPT2 = Adapter(
    name="gpt2",
    model_types=("gpt2", "raffm_gpt2"),
    rules=_rules(
        [  # Conv1D weights are stored [in, out]
            (r"(^|\.)(wte|wpe)\.weight$", ("full", "hidden")),
            (r"^(lm_head|score)\.weight$", ("full", "hidden")),  # GPT2ForSequenceClassification scores every position
            (r"attn\.c_attn\.weight$", ("hidden", "qkv")),
            (r"attn\.c_attn\.bias$", ("qkv",)),
            (r"attn\.c_proj\.weight$", ("v", "hidden")),
            (r"mlp\.c_fc\.weight$", ("hidden", "ffn")),
            (r"mlp\.c_fc\.bias$", ("ffn",)),
            (r"mlp\.c_proj\.weight$", ("ffn", "hidden")),
            (r"(ln_(1|2|f)\.(weight|bias)|c_proj\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"(?:^|\.)h\.(\d+)\."),
    layers_attr="h",
    attention_module="attn",
    head_dim_attr="head_dim",
    vocab_embeddings=re.compile(r"(^|\.)wte\.weight$"),
    heads_attr="num_heads",
    ffn_attr="n_inner",
    input_embeddings=re.compile(r"(^|\.)(wte|wpe)$"),
    ffn_saves=5,  # gelu_new, every GPT-2 checkpoint's activation_function: as Phi's
    fixed_head_dim=True,
    causal_lm=True,
)

GPT_NEOX = Adapter(
    name="gpt_neox",
    model_types=("gpt_neox", "raffm_gpt_neox"),
    rules=_rules(
        [
            (r"(^|\.)embed_in\.weight$", ("full", "hidden")),
            (r"^(lm_head|score)\.weight$", ("full", "hidden")),  # the classifier scores every position
            (r"attention\.query_key_value\.weight$", ("hqkv", "hidden")),
            (r"attention\.query_key_value\.bias$", ("hqkv",)),
            (r"attention\.dense\.weight$", ("hidden", "v")),
            (r"mlp\.dense_h_to_4h\.weight$", ("ffn", "hidden")),
            (r"mlp\.dense_h_to_4h\.bias$", ("ffn",)),
            (r"mlp\.dense_4h_to_h\.weight$", ("hidden", "ffn")),
            (r"(layer_?norm\.(weight|bias)|dense\.bias|dense_4h_to_h\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"layers\.(\d+)\."),
    layers_attr="layers",
    attention_module="attention",
    head_dim_attr="head_size",
    vocab_embeddings=re.compile(r"(^|\.)embed_in\.weight$"),
    heads_attr=None,  # GPTNeoXAttention views its fused output as (..., -1, 3 * head_size)
    input_embeddings=re.compile(r"(^|\.)embed_in$"),
    rope=True,
    causal_lm=True,
)

MODERNBERT = Adapter(
    name="modernbert",
    model_types=("modernbert", "raffm_modernbert"),
    rules=_rules(
        [
            (r"embeddings\.tok_embeddings\.weight$", ("full", "hidden")),
            (r"attn\.Wqkv\.weight$", ("qkv", "hidden")),
            (r"attn\.Wqkv\.bias$", ("qkv",)),
            (r"attn\.Wo\.weight$", ("hidden", "v")),
            (r"mlp\.Wi\.weight$", ("gffn", "hidden")),
            (r"mlp\.Wi\.bias$", ("gffn",)),
            (r"mlp\.Wo\.weight$", ("hidden", "ffn")),
            (r"^head\.dense\.weight$", ("hidden", "hidden")),
            (r"^classifier\.weight$", ("full", "hidden")),
            (r"^classifier\.bias$", ("full",)),
            (r"(norm\.(weight|bias)|Wo\.bias|head\.dense\.bias)$", ("hidden",)),
        ]
    ),
    layer_pattern=re.compile(r"layers\.(\d+)\."),
    layers_attr="layers",
    attention_module="attn",
    head_dim_attr="head_dim",
    vocab_embeddings=re.compile(r"embeddings\.tok_embeddings\.weight$"),
    heads_attr=None,  # ModernBertAttention views its fused output as (..., 3, -1, head_dim)
    ffn_matrices=3,  # Wi holds two matrices' rows (input and gate), Wo one
    rope=True,
    body_modules=("head",),
)

ADAPTERS = (BERT, DISTILBERT, DEBERTA, VIT, LLAMA, OPT, PHI, GPT2, GPT_NEOX, MODERNBERT)


def adapter_for(config_or_model: Any) -> Adapter:
    """The adapter for a ``transformers`` config or model; ``ValueError`` names the supported model types."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if adapter is BERT and getattr(config, "embedding_size", None) not in (None, config.hidden_size):
                return FACTORIZED_BERT
            if adapter is OPT:
                _check_opt_layout(config)
            if adapter is PHI and getattr(config, "qk_layernorm", False):
                raise ValueError("Phi with qk_layernorm=True (a LayerNorm over every query and key head) is not "
                                 "supported")
            if adapter is GPT2:
                _check_gpt2_layout(config)
            if adapter is MODERNBERT:
                _check_modernbert_layout(config)
            return adapter
    supported = sorted(t for a in ADAPTERS for t in a.model_types if not t.startswith("raffm_"))
    raise ValueError(f"model type {model_type!r} is not supported; supported: {', '.join(supported)}")


def _check_opt_layout(config: Any) -> None:
    """Refuse the OPT layouts the adapter and the cost model do not describe (OPT-350m has both)."""
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise ValueError(
            f"OPT with word_embed_proj_dim {config.word_embed_proj_dim} != hidden_size {config.hidden_size} (embeddings"
            " projected into and out of the layers by project_in/project_out, as OPT-350m's) is not supported"
        )
    if not getattr(config, "do_layer_norm_before", True):
        raise ValueError("OPT with do_layer_norm_before=False (post-LN layers, as OPT-350m's) is not supported")


def _check_gpt2_layout(config: Any) -> None:
    """Refuse the GPT-2 options the adapter and the cost model do not describe."""
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with add_cross_attention=True (cross-attention layers over an encoder's states) is not "
                         "supported")
    if getattr(config, "reorder_and_upcast_attn", False):
        raise ValueError("GPT-2 with reorder_and_upcast_attn=True (an eager attention kernel that saves other tensors "
                         "for backward) is not supported")


def _check_modernbert_layout(config: Any) -> None:
    """Refuse the ModernBERT options the adapter and the cost model do not describe."""
    if getattr(config, "_attn_implementation", None) in ("flash_attention_2", "flash_attention_3"):
        raise ValueError("ModernBERT with attn_implementation flash_attention (unpadded batches) is not supported; "
                         "use sdpa or eager")


def tied_aliases(model: nn.Module) -> frozenset[str]:
    """Names under which ``model.state_dict()`` repeats a parameter it already holds under an earlier name (a tied
    LM head: ``lm_head.weight`` is ``model.embed_tokens.weight``). Works on meta-device models too."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return frozenset(every - {name for name, _ in model.named_parameters()})


def canonical_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shapes of ``model``'s state dict without tied aliases: what slice plans and the cost model count, so a
    tied matrix is priced, sliced and shipped once."""
    aliases = tied_aliases(model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in aliases}


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body of a model with or without a task head (``model.bert``, ``model.vit``...)."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def layer_modules(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of ``model``, in the order they run."""
    return cast(nn.ModuleList, functools.reduce(getattr, adapter_for(model).layers_attr.split("."), base_model(model)))
