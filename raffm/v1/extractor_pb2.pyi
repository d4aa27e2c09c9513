from raffm.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlanPurpose(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_PURPOSE_UNSPECIFIED: _ClassVar[PlanPurpose]
    PLAN_PURPOSE_TRAIN: _ClassVar[PlanPurpose]
    PLAN_PURPOSE_INFER: _ClassVar[PlanPurpose]
PLAN_PURPOSE_UNSPECIFIED: PlanPurpose
PLAN_PURPOSE_TRAIN: PlanPurpose
PLAN_PURPOSE_INFER: PlanPurpose

class JobParams(_message.Message):
    __slots__ = ("batch_size", "seq_len", "wire_dtype", "deadline_s", "local_steps", "optimizer", "holds_frozen")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FROZEN_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    seq_len: int
    wire_dtype: _common_pb2.WireDtype
    deadline_s: float
    local_steps: int
    optimizer: str
    holds_frozen: bool
    def __init__(self, batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., wire_dtype: _Optional[_Union[_common_pb2.WireDtype, str]] = ..., deadline_s: _Optional[float] = ..., local_steps: _Optional[int] = ..., optimizer: _Optional[str] = ..., holds_frozen: _Optional[bool] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("profile", "job", "model_version", "purpose", "strategy")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    profile: _common_pb2.DeviceProfile
    job: JobParams
    model_version: str
    purpose: PlanPurpose
    strategy: str
    def __init__(self, profile: _Optional[_Union[_common_pb2.DeviceProfile, _Mapping]] = ..., job: _Optional[_Union[JobParams, _Mapping]] = ..., model_version: _Optional[str] = ..., purpose: _Optional[_Union[PlanPurpose, str]] = ..., strategy: _Optional[str] = ...) -> None: ...

class CostEstimate(_message.Message):
    __slots__ = ("params", "wire_bytes", "flops_per_sample", "train_memory_mb", "infer_memory_mb", "download_s", "compute_s", "upload_s", "est_seconds", "upload_bytes", "trained_params")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FLOPS_PER_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    INFER_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_S_FIELD_NUMBER: _ClassVar[int]
    EST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: int
    wire_bytes: int
    flops_per_sample: int
    train_memory_mb: float
    infer_memory_mb: float
    download_s: float
    compute_s: float
    upload_s: float
    est_seconds: float
    upload_bytes: int
    trained_params: int
    def __init__(self, params: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., flops_per_sample: _Optional[int] = ..., train_memory_mb: _Optional[float] = ..., infer_memory_mb: _Optional[float] = ..., download_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., upload_s: _Optional[float] = ..., est_seconds: _Optional[float] = ..., upload_bytes: _Optional[int] = ..., trained_params: _Optional[int] = ...) -> None: ...

class PlanReply(_message.Message):
    __slots__ = ("spec", "cost", "model_version", "param_fraction", "full_spec", "recipe")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAM_FRACTION_FIELD_NUMBER: _ClassVar[int]
    FULL_SPEC_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    spec: _common_pb2.ElasticSpec
    cost: CostEstimate
    model_version: str
    param_fraction: float
    full_spec: _common_pb2.ElasticSpec
    recipe: _common_pb2.TrainingRecipe
    def __init__(self, spec: _Optional[_Union[_common_pb2.ElasticSpec, _Mapping]] = ..., cost: _Optional[_Union[CostEstimate, _Mapping]] = ..., model_version: _Optional[str] = ..., param_fraction: _Optional[float] = ..., full_spec: _Optional[_Union[_common_pb2.ElasticSpec, _Mapping]] = ..., recipe: _Optional[_Union[_common_pb2.TrainingRecipe, _Mapping]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("ticket", "resume_from", "chunk_bytes", "have_sha256")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HAVE_SHA256_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    resume_from: _common_pb2.ResumePoint
    chunk_bytes: int
    have_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, ticket: _Optional[bytes] = ..., resume_from: _Optional[_Union[_common_pb2.ResumePoint, _Mapping]] = ..., chunk_bytes: _Optional[int] = ..., have_sha256: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SliceMessage(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: _common_pb2.Manifest
    chunk: _common_pb2.TensorChunk
    def __init__(self, manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...
