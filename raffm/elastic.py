"""Sub-models as real ``transformers`` models.

An elastic model class subclasses the stock ``transformers`` class (``BertModel``, ``ViTForImageClassification``...)
and shrinks itself to the spec stored in its config (``config.raffm_spec``), so ``save_pretrained`` and
``from_pretrained`` round-trip it like any HF model. The config keeps the *global* architecture sizes; the spec says
which leading block of them this model holds. Importing this module registers the classes with the ``Auto*``
factories, so ``AutoModel.from_pretrained(folder)`` loads a saved sub-model.

Attention keeps the global model's softmax scaling (1/sqrt(global head_dim)) when a sub-model keeps fewer head
dimensions: the truncated dot products then approximate the global ones instead of being rescaled.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    CamembertConfig,
    CamembertForSequenceClassification,
    CamembertModel,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DebertaV2Model,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraForSequenceClassification,
    ElectraModel,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
    GPTNeoXModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    ModernBertModel,
    OPTConfig,
    OPTForCausalLM,
    OPTForSequenceClassification,
    OPTModel,
    PhiConfig,
    PhiForCausalLM,
    PhiForSequenceClassification,
    PhiModel,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)
from transformers.pytorch_utils import Conv1D

from raffm.arch import Adapter, adapter_for, base_model, canonical_shapes, layer_modules, tied_aliases
from raffm.slicing import SlicePlan, slice_plan, slice_state
from raffm.spec import ElasticSpec


def _shrink(model: PreTrainedModel, spec: ElasticSpec) -> None:
    """Resize ``model`` in place to ``spec``: parameters become uninitialised tensors of the sub-model shapes."""
    adapter = adapter_for(model)
    dims = adapter.dims(model.config)
    body = base_model(model)
    *parents, attr = adapter.layers_attr.split(".")
    owner = functools.reduce(getattr, parents, body)
    setattr(owner, attr, nn.ModuleList(list(getattr(owner, attr))[: spec.depth]))

    # A task model that builds its body through an Auto factory (Phi's sequence classifier) got an elastic body that
    # shrank itself already: only the rest is resized here.
    shrunk = tuple(f"{n}." for n, m in model.named_modules() if n and isinstance(m, _ElasticMixin))
    params = [(n, p) for n, p in model.named_parameters() if not n.startswith(shrunk)]
    plan = slice_plan(adapter, dims, spec, {n: tuple(p.shape) for n, p in params})
    for name, param in params:
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        if tuple(param.shape) != plan[name].sub_shape:
            new = torch.empty(plan[name].sub_shape, dtype=param.dtype, device=param.device)
            setattr(module, pname, nn.Parameter(new, requires_grad=param.requires_grad))
    model.tie_weights()  # a tied LM head shares the resized embedding again (a nested cut's skeleton is never loaded)
    _sync_module_attributes(model, adapter, spec)


def _sync_module_attributes(model: nn.Module, adapter: Adapter, spec: ElasticSpec) -> None:
    """Make module attributes that forward() reads agree with the resized parameters."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
        elif isinstance(module, nn.Conv2d):
            module.out_channels = module.weight.shape[0]
        elif isinstance(module, Conv1D):  # GPT-2's projections, weight [in, out]
            module.nx, module.nf = module.weight.shape
    for layer, layer_spec in zip(layer_modules(model), spec.layers):
        attention = layer.get_submodule(adapter.attention_module)
        setattr(attention, adapter.head_dim_attr, layer_spec.head_dim)
        if adapter.heads_attr is not None:
            setattr(attention, adapter.heads_attr, layer_spec.heads)
        for attr in ("all_head_size", "split_size"):  # BERT's context width; where GPT-2 splits its fused q/k/v
            if hasattr(attention, attr):
                setattr(attention, attr, layer_spec.heads * layer_spec.head_dim)


class _ElasticMixin:
    """Shrinks a stock model to ``config.raffm_spec`` right after the stock constructor built it."""

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        spec = getattr(config, "raffm_spec", None)
        if spec is not None:
            _shrink(self, ElasticSpec.from_dict(spec))  # type: ignore[arg-type]

    @property
    def elastic_spec(self) -> ElasticSpec:
        return ElasticSpec.from_dict(self.config.raffm_spec)  # type: ignore[attr-defined]


def _elastic_config(base: type[PretrainedConfig], model_type: str) -> type[PretrainedConfig]:
    def __init__(self: Any, raffm_spec: dict[str, Any] | None = None, **kwargs: Any) -> None:
        base.__init__(self, **kwargs)
        self.raffm_spec = raffm_spec

    return type(f"Elastic{base.__name__}", (base,), {"model_type": model_type, "__init__": __init__})


# stock config -> the stock model classes built on it, each with the Auto factory that should load its elastic twin.
# RoBERTa, XLM-R, CamemBERT and ELECTRA copy BERT's module layout (ELECTRA-small adds an embedding projection);
# DistilBERT and ModernBERT have adapters of their own (raffm.arch). OPT, Phi, GPT-2 and GPT-NeoX are the decoder
# families with a body and a classifier too.
_STOCK: dict[type[PretrainedConfig], tuple[tuple[type[PreTrainedModel], Any], ...]] = {
    BertConfig: ((BertModel, AutoModel), (BertForSequenceClassification, AutoModelForSequenceClassification)),
    RobertaConfig: ((RobertaModel, AutoModel), (RobertaForSequenceClassification, AutoModelForSequenceClassification)),
    XLMRobertaConfig: ((XLMRobertaModel, AutoModel),
                       (XLMRobertaForSequenceClassification, AutoModelForSequenceClassification)),
    CamembertConfig: ((CamembertModel, AutoModel),
                      (CamembertForSequenceClassification, AutoModelForSequenceClassification)),
    ElectraConfig: ((ElectraModel, AutoModel), (ElectraForSequenceClassification, AutoModelForSequenceClassification)),
    DistilBertConfig: ((DistilBertModel, AutoModel),
                       (DistilBertForSequenceClassification, AutoModelForSequenceClassification)),
    DebertaV2Config: ((DebertaV2Model, AutoModel),
                      (DebertaV2ForSequenceClassification, AutoModelForSequenceClassification)),
    ModernBertConfig: ((ModernBertModel, AutoModel),
                       (ModernBertForSequenceClassification, AutoModelForSequenceClassification)),
    ViTConfig: ((ViTModel, AutoModel), (ViTForImageClassification, AutoModelForImageClassification)),
    LlamaConfig: ((LlamaForCausalLM, AutoModelForCausalLM),),
    Qwen2Config: ((Qwen2ForCausalLM, AutoModelForCausalLM),),
    Qwen3Config: ((Qwen3ForCausalLM, AutoModelForCausalLM),),
    MistralConfig: ((MistralForCausalLM, AutoModelForCausalLM),),
    GemmaConfig: ((GemmaForCausalLM, AutoModelForCausalLM),),
    SmolLM3Config: ((SmolLM3ForCausalLM, AutoModelForCausalLM),),
    GraniteConfig: ((GraniteForCausalLM, AutoModelForCausalLM),),
    OPTConfig: ((OPTModel, AutoModel), (OPTForCausalLM, AutoModelForCausalLM),
                (OPTForSequenceClassification, AutoModelForSequenceClassification)),
    PhiConfig: ((PhiModel, AutoModel), (PhiForCausalLM, AutoModelForCausalLM),
                (PhiForSequenceClassification, AutoModelForSequenceClassification)),
    GPT2Config: ((GPT2Model, AutoModel), (GPT2LMHeadModel, AutoModelForCausalLM),
                 (GPT2ForSequenceClassification, AutoModelForSequenceClassification)),
    GPTNeoXConfig: ((GPTNeoXModel, AutoModel), (GPTNeoXForCausalLM, AutoModelForCausalLM),
                    (GPTNeoXForSequenceClassification, AutoModelForSequenceClassification)),
}
# stock class -> (elastic config class, Auto factory that should load it)
_FAMILY: dict[type[PreTrainedModel], tuple[type[PretrainedConfig], Any]] = {}
for _stock_config, _classes in _STOCK.items():
    _config_cls = _elastic_config(_stock_config, f"raffm_{_stock_config.model_type}")
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    for _stock, _auto in _classes:
        _FAMILY[_stock] = (_config_cls, _auto)
ELASTIC_CLASSES: dict[type[PreTrainedModel], type[PreTrainedModel]] = {}  # stock -> elastic
_STOCK_OF: dict[type[PreTrainedModel], type[PreTrainedModel]] = {}  # stock or elastic -> stock
for _stock, (_config_cls, _auto) in _FAMILY.items():
    _elastic = type(f"Elastic{_stock.__name__}", (_ElasticMixin, _stock), {"config_class": _config_cls})
    ELASTIC_CLASSES[_stock] = _elastic
    _STOCK_OF[_stock] = _STOCK_OF[_elastic] = _stock
    _auto.register(_config_cls, _elastic, exist_ok=True)


def stock_class(model: PreTrainedModel) -> type[PreTrainedModel]:
    """The stock ``transformers`` class a (global or elastic) model is built on."""
    try:
        return _STOCK_OF[type(model)]
    except KeyError:
        supported = ", ".join(c.__name__ for c in _FAMILY)
        raise ValueError(f"{type(model).__name__} is not supported; supported: {supported}") from None


def elastic_config(config: PretrainedConfig, spec: ElasticSpec, stock: type[PreTrainedModel]) -> PretrainedConfig:
    """The config of a sub-model: the global architecture sizes plus the spec."""
    values = config.to_dict()
    for key in ("model_type", "raffm_spec", "transformers_version"):
        values.pop(key, None)
    values["architectures"] = [ELASTIC_CLASSES[stock].__name__]
    config_class: Any = _FAMILY[stock][0]
    return config_class(raffm_spec=spec.to_dict(), **values)  # type: ignore[no-any-return]


def extract(model: PreTrainedModel, spec: ElasticSpec) -> PreTrainedModel:
    """The sub-model of ``model`` (a salience-ordered global model) kept by ``spec``, as a new HF model.

    The global model is not modified; the sub-model owns copies of its weights. A tied LM head is sliced once (as
    the input embedding) and tied again in the sub-model.
    """
    if getattr(model.config, "raffm_spec", None) is not None:
        raise ValueError("extract() takes a global model; this one is already a sub-model")
    stock = stock_class(model)
    config = elastic_config(model.config, spec, stock)
    with torch.device("meta"):  # skip random init: every parameter is overwritten below
        sub = ELASTIC_CLASSES[stock](config)
    result = sub.load_state_dict(slice_state(model.state_dict(), plan_for(model, spec)), assign=True, strict=False)
    aliases = tied_aliases(model)
    missing = set(result.missing_keys) - aliases
    if missing or result.unexpected_keys:
        raise RuntimeError(f"sub-model state mismatch: missing {sorted(missing)}, unexpected {result.unexpected_keys}")
    if aliases:
        sub.tie_weights()  # the tied head is still the meta tensor: point it at the loaded embedding
        if tied_aliases(sub) != aliases:
            raise RuntimeError(f"the sub-model did not tie {sorted(aliases)} again")
    global_buffers = dict(model.named_buffers())
    for name, buffer in list(sub.named_buffers()):  # non-persistent buffers (position ids) are not in state_dict
        if buffer.is_meta:
            module_name, _, bname = name.rpartition(".")
            sub.get_submodule(module_name).register_buffer(bname, global_buffers[name].clone(), persistent=False)
    sub.train(model.training)
    return sub


def plan_for(model: PreTrainedModel, spec: ElasticSpec) -> SlicePlan:
    """The slice plan of a global model's state dict for ``spec``."""
    adapter = adapter_for(model)
    return slice_plan(adapter, adapter.dims(model.config), spec, canonical_shapes(model))


def stock_config(config: PretrainedConfig, spec: ElasticSpec) -> PretrainedConfig:
    """A plain ``transformers`` config of the decoder sub-model ``spec`` (grouped adapters: the Llama family), so
    its sliced weights load into the stock class (``LlamaForCausalLM(stock_config(...))``) with no RaFFM code.

    Only uniform specs (every layer the same width) fit a stock config; the elastic classes hold any spec.
    """
    adapter = adapter_for(config)
    if not adapter.grouped:
        raise ValueError(f"a stock config of a cut {adapter.name} model cannot express its head sizes; use extract()")
    dims = adapter.dims(config)
    spec.validate(dims)
    if len(set(spec.layers)) != 1:
        raise ValueError(f"spec {spec.key()} has layers of different widths; a stock config needs uniform ones")
    layer = spec.layers[0]
    values = config.to_dict()
    for key in ("raffm_spec", "transformers_version"):
        values.pop(key, None)
    values.update(
        hidden_size=spec.hidden,
        num_hidden_layers=spec.depth,
        num_attention_heads=layer.heads * dims.group,
        num_key_value_heads=layer.heads,
        head_dim=layer.head_dim,  # explicit: hidden // num_attention_heads no longer gives it
        intermediate_size=layer.ffn,
    )
    for key in ("layer_types", "no_rope_layers"):  # one entry per layer (Qwen2's attention types, SmolLM3's NoPE)
        if isinstance(values.get(key), list):
            values[key] = values[key][: spec.depth]
    model_type = str(values.pop("model_type")).removeprefix("raffm_")
    return AutoConfig.for_model(model_type, **values)
