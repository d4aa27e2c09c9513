from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_UNSPECIFIED: _ClassVar[WireDtype]
    WIRE_DTYPE_FP32: _ClassVar[WireDtype]
    WIRE_DTYPE_FP16: _ClassVar[WireDtype]
    WIRE_DTYPE_BF16: _ClassVar[WireDtype]
WIRE_DTYPE_UNSPECIFIED: WireDtype
WIRE_DTYPE_FP32: WireDtype
WIRE_DTYPE_FP16: WireDtype
WIRE_DTYPE_BF16: WireDtype

class DeviceProfile(_message.Message):
    __slots__ = ("train_memory_mb", "infer_memory_mb", "gflops", "up_mbps", "down_mbps", "battery_pct", "availability", "tier")
    TRAIN_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    INFER_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    GFLOPS_FIELD_NUMBER: _ClassVar[int]
    UP_MBPS_FIELD_NUMBER: _ClassVar[int]
    DOWN_MBPS_FIELD_NUMBER: _ClassVar[int]
    BATTERY_PCT_FIELD_NUMBER: _ClassVar[int]
    AVAILABILITY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    train_memory_mb: int
    infer_memory_mb: int
    gflops: float
    up_mbps: float
    down_mbps: float
    battery_pct: float
    availability: AvailabilityWindow
    tier: str
    def __init__(self, train_memory_mb: _Optional[int] = ..., infer_memory_mb: _Optional[int] = ..., gflops: _Optional[float] = ..., up_mbps: _Optional[float] = ..., down_mbps: _Optional[float] = ..., battery_pct: _Optional[float] = ..., availability: _Optional[_Union[AvailabilityWindow, _Mapping]] = ..., tier: _Optional[str] = ...) -> None: ...

class AvailabilityWindow(_message.Message):
    __slots__ = ("start_minute_utc", "end_minute_utc")
    START_MINUTE_UTC_FIELD_NUMBER: _ClassVar[int]
    END_MINUTE_UTC_FIELD_NUMBER: _ClassVar[int]
    start_minute_utc: int
    end_minute_utc: int
    def __init__(self, start_minute_utc: _Optional[int] = ..., end_minute_utc: _Optional[int] = ...) -> None: ...

class LayerSpec(_message.Message):
    __slots__ = ("heads", "head_dim", "ffn")
    HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    FFN_FIELD_NUMBER: _ClassVar[int]
    heads: int
    head_dim: int
    ffn: int
    def __init__(self, heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., ffn: _Optional[int] = ...) -> None: ...

class ElasticSpec(_message.Message):
    __slots__ = ("hidden", "layers")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    hidden: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerSpec]
    def __init__(self, hidden: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerSpec, _Mapping]]] = ...) -> None: ...

class TrainingRecipe(_message.Message):
    __slots__ = ("frozen_tensors", "nested", "nested_sampled", "distill", "frozen_dtype", "activation_checkpointing", "distill_hidden", "lora_rank", "lora_targets", "lora_alpha", "prior_correction", "base_dtype", "lr_scale", "dropout_off")
    FROZEN_TENSORS_FIELD_NUMBER: _ClassVar[int]
    NESTED_FIELD_NUMBER: _ClassVar[int]
    NESTED_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    DISTILL_FIELD_NUMBER: _ClassVar[int]
    FROZEN_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    DISTILL_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    PRIOR_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    BASE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_OFF_FIELD_NUMBER: _ClassVar[int]
    frozen_tensors: _containers.RepeatedScalarFieldContainer[str]
    nested: _containers.RepeatedCompositeFieldContainer[ElasticSpec]
    nested_sampled: int
    distill: float
    frozen_dtype: str
    activation_checkpointing: bool
    distill_hidden: float
    lora_rank: int
    lora_targets: _containers.RepeatedScalarFieldContainer[str]
    lora_alpha: float
    prior_correction: float
    base_dtype: str
    lr_scale: float
    dropout_off: bool
    def __init__(self, frozen_tensors: _Optional[_Iterable[str]] = ..., nested: _Optional[_Iterable[_Union[ElasticSpec, _Mapping]]] = ..., nested_sampled: _Optional[int] = ..., distill: _Optional[float] = ..., frozen_dtype: _Optional[str] = ..., activation_checkpointing: _Optional[bool] = ..., distill_hidden: _Optional[float] = ..., lora_rank: _Optional[int] = ..., lora_targets: _Optional[_Iterable[str]] = ..., lora_alpha: _Optional[float] = ..., prior_correction: _Optional[float] = ..., base_dtype: _Optional[str] = ..., lr_scale: _Optional[float] = ..., dropout_off: _Optional[bool] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    sha256: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("tensors", "total_bytes", "model_version", "spec", "chunk_bytes", "architecture", "wire_dtype", "model_config_json")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    total_bytes: int
    model_version: str
    spec: ElasticSpec
    chunk_bytes: int
    architecture: str
    wire_dtype: WireDtype
    model_config_json: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., model_version: _Optional[str] = ..., spec: _Optional[_Union[ElasticSpec, _Mapping]] = ..., chunk_bytes: _Optional[int] = ..., architecture: _Optional[str] = ..., wire_dtype: _Optional[_Union[WireDtype, str]] = ..., model_config_json: _Optional[str] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("tensor", "offset", "data")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    data: bytes
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ResumePoint(_message.Message):
    __slots__ = ("tensor", "offset")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    offset: int
    def __init__(self, tensor: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("reason", "message", "field", "hint", "reject_reason")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    REJECT_REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    field: str
    hint: str
    reject_reason: str
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., hint: _Optional[str] = ..., reject_reason: _Optional[str] = ...) -> None: ...
