import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from raffm.v1 import common_pb2 as _common_pb2
from raffm.v1 import extractor_pb2 as _extractor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_TEXT_CLASSIFICATION: _ClassVar[TaskKind]
    TASK_KIND_IMAGE_CLASSIFICATION: _ClassVar[TaskKind]
    TASK_KIND_CAUSAL_LM: _ClassVar[TaskKind]

class FailureReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_REASON_UNSPECIFIED: _ClassVar[FailureReason]
    FAILURE_REASON_REFUSED: _ClassVar[FailureReason]
    FAILURE_REASON_OUT_OF_MEMORY: _ClassVar[FailureReason]
    FAILURE_REASON_DEADLINE: _ClassVar[FailureReason]
    FAILURE_REASON_DOWNLOAD: _ClassVar[FailureReason]
    FAILURE_REASON_DATA: _ClassVar[FailureReason]
    FAILURE_REASON_CRASH: _ClassVar[FailureReason]
    FAILURE_REASON_OTHER: _ClassVar[FailureReason]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class AggregationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_MODE_UNSPECIFIED: _ClassVar[AggregationMode]
    AGGREGATION_MODE_SLICED_FEDAVG: _ClassVar[AggregationMode]
    AGGREGATION_MODE_PAPER: _ClassVar[AggregationMode]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_OPEN: _ClassVar[RoundState]
    ROUND_STATE_AGGREGATING: _ClassVar[RoundState]
    ROUND_STATE_CLOSED: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_TEXT_CLASSIFICATION: TaskKind
TASK_KIND_IMAGE_CLASSIFICATION: TaskKind
TASK_KIND_CAUSAL_LM: TaskKind
FAILURE_REASON_UNSPECIFIED: FailureReason
FAILURE_REASON_REFUSED: FailureReason
FAILURE_REASON_OUT_OF_MEMORY: FailureReason
FAILURE_REASON_DEADLINE: FailureReason
FAILURE_REASON_DOWNLOAD: FailureReason
FAILURE_REASON_DATA: FailureReason
FAILURE_REASON_CRASH: FailureReason
FAILURE_REASON_OTHER: FailureReason
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
AGGREGATION_MODE_UNSPECIFIED: AggregationMode
AGGREGATION_MODE_SLICED_FEDAVG: AggregationMode
AGGREGATION_MODE_PAPER: AggregationMode
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_OPEN: RoundState
ROUND_STATE_AGGREGATING: RoundState
ROUND_STATE_CLOSED: RoundState
ROUND_STATE_FAILED: RoundState

class PollRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("seconds", "reason")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    reason: str
    def __init__(self, seconds: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class HyperParams(_message.Message):
    __slots__ = ("local_epochs", "local_steps", "batch_size", "seq_len", "lr", "fedprox_mu", "wire_dtype", "weight_decay", "seed", "optimizer", "warmup_steps")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    FEDPROX_MU_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    local_steps: int
    batch_size: int
    seq_len: int
    lr: float
    fedprox_mu: float
    wire_dtype: _common_pb2.WireDtype
    weight_decay: float
    seed: int
    optimizer: str
    warmup_steps: int
    def __init__(self, local_epochs: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., lr: _Optional[float] = ..., fedprox_mu: _Optional[float] = ..., wire_dtype: _Optional[_Union[_common_pb2.WireDtype, str]] = ..., weight_decay: _Optional[float] = ..., seed: _Optional[int] = ..., optimizer: _Optional[str] = ..., warmup_steps: _Optional[int] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("kind", "num_labels", "architecture", "dataset", "label_names")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    num_labels: int
    architecture: str
    dataset: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., num_labels: _Optional[int] = ..., architecture: _Optional[str] = ..., dataset: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("round_id", "job_id", "model_version", "spec", "hparams", "deadline", "ticket", "task", "extractor_target", "predicted", "round_index", "recipe")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    HPARAMS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    EXTRACTOR_TARGET_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_INDEX_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    job_id: str
    model_version: str
    spec: _common_pb2.ElasticSpec
    hparams: HyperParams
    deadline: _timestamp_pb2.Timestamp
    ticket: bytes
    task: TaskInfo
    extractor_target: str
    predicted: _extractor_pb2.CostEstimate
    round_index: int
    recipe: _common_pb2.TrainingRecipe
    def __init__(self, round_id: _Optional[str] = ..., job_id: _Optional[str] = ..., model_version: _Optional[str] = ..., spec: _Optional[_Union[_common_pb2.ElasticSpec, _Mapping]] = ..., hparams: _Optional[_Union[HyperParams, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ticket: _Optional[bytes] = ..., task: _Optional[_Union[TaskInfo, _Mapping]] = ..., extractor_target: _Optional[str] = ..., predicted: _Optional[_Union[_extractor_pb2.CostEstimate, _Mapping]] = ..., round_index: _Optional[int] = ..., recipe: _Optional[_Union[_common_pb2.TrainingRecipe, _Mapping]] = ...) -> None: ...

class PollReply(_message.Message):
    __slots__ = ("wait", "assignment")
    WAIT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    wait: Wait
    assignment: Assignment
    def __init__(self, wait: _Optional[_Union[Wait, _Mapping]] = ..., assignment: _Optional[_Union[Assignment, _Mapping]] = ...) -> None: ...

class TrainMetrics(_message.Message):
    __slots__ = ("loss", "steps", "seconds", "peak_memory_mb", "accuracy", "download_bytes", "step_seconds", "samples", "download_seconds", "download_mbps", "upload_mbps", "label_counts")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_MBPS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_MBPS_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    steps: int
    seconds: float
    peak_memory_mb: float
    accuracy: float
    download_bytes: int
    step_seconds: float
    samples: int
    download_seconds: float
    download_mbps: float
    upload_mbps: float
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, loss: _Optional[float] = ..., steps: _Optional[int] = ..., seconds: _Optional[float] = ..., peak_memory_mb: _Optional[float] = ..., accuracy: _Optional[float] = ..., download_bytes: _Optional[int] = ..., step_seconds: _Optional[float] = ..., samples: _Optional[int] = ..., download_seconds: _Optional[float] = ..., download_mbps: _Optional[float] = ..., upload_mbps: _Optional[float] = ..., label_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("ticket", "sample_count", "metrics")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    sample_count: int
    metrics: TrainMetrics
    def __init__(self, ticket: _Optional[bytes] = ..., sample_count: _Optional[int] = ..., metrics: _Optional[_Union[TrainMetrics, _Mapping]] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "manifest", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    manifest: _common_pb2.Manifest
    chunk: _common_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., manifest: _Optional[_Union[_common_pb2.Manifest, _Mapping]] = ..., chunk: _Optional[_Union[_common_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("accepted", "bytes_received", "round_id", "tensors_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    bytes_received: int
    round_id: str
    tensors_received: int
    def __init__(self, accepted: _Optional[bool] = ..., bytes_received: _Optional[int] = ..., round_id: _Optional[str] = ..., tensors_received: _Optional[int] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("ticket",)
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    def __init__(self, ticket: _Optional[bytes] = ...) -> None: ...

class QueryUploadReply(_message.Message):
    __slots__ = ("complete_tensors", "resume_from", "bytes_received", "committed")
    COMPLETE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    complete_tensors: _containers.RepeatedScalarFieldContainer[str]
    resume_from: _common_pb2.ResumePoint
    bytes_received: int
    committed: bool
    def __init__(self, complete_tensors: _Optional[_Iterable[str]] = ..., resume_from: _Optional[_Union[_common_pb2.ResumePoint, _Mapping]] = ..., bytes_received: _Optional[int] = ..., committed: _Optional[bool] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("ticket", "reason", "detail")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    reason: FailureReason
    detail: str
    def __init__(self, ticket: _Optional[bytes] = ..., reason: _Optional[_Union[FailureReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ReportFailureReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "model", "task", "state", "num_rounds", "clients_per_round", "quorum", "round_deadline_s", "hparams", "aggregation", "server_lr", "server_optimizer", "current_round", "model_version", "created_at")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    HPARAMS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SERVER_LR_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    model: str
    task: TaskInfo
    state: JobState
    num_rounds: int
    clients_per_round: int
    quorum: int
    round_deadline_s: float
    hparams: HyperParams
    aggregation: AggregationMode
    server_lr: float
    server_optimizer: str
    current_round: int
    model_version: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., model: _Optional[str] = ..., task: _Optional[_Union[TaskInfo, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., num_rounds: _Optional[int] = ..., clients_per_round: _Optional[int] = ..., quorum: _Optional[int] = ..., round_deadline_s: _Optional[float] = ..., hparams: _Optional[_Union[HyperParams, _Mapping]] = ..., aggregation: _Optional[_Union[AggregationMode, str]] = ..., server_lr: _Optional[float] = ..., server_optimizer: _Optional[str] = ..., current_round: _Optional[int] = ..., model_version: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("round_id", "job_id", "index", "state", "model_version", "result_model_version", "opened_at", "deadline", "closed_at", "quorum", "assigned", "accepted", "rejected", "dropped", "bytes_down", "bytes_up", "mean_train_loss", "full_model_bytes", "evaluation", "extensions", "failures", "tiers", "label_counts")
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULT_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPENED_AT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CLOSED_AT_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    MEAN_TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    FULL_MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LABEL_COUNTS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    job_id: str
    index: int
    state: RoundState
    model_version: str
    result_model_version: str
    opened_at: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    closed_at: _timestamp_pb2.Timestamp
    quorum: int
    assigned: int
    accepted: int
    rejected: int
    dropped: int
    bytes_down: int
    bytes_up: int
    mean_train_loss: float
    full_model_bytes: int
    evaluation: _containers.ScalarMap[str, float]
    extensions: int
    failures: _containers.RepeatedCompositeFieldContainer[RoundFailures]
    tiers: _containers.RepeatedCompositeFieldContainer[TierCosts]
    label_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round_id: _Optional[str] = ..., job_id: _Optional[str] = ..., index: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., model_version: _Optional[str] = ..., result_model_version: _Optional[str] = ..., opened_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., closed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., quorum: _Optional[int] = ..., assigned: _Optional[int] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., dropped: _Optional[int] = ..., bytes_down: _Optional[int] = ..., bytes_up: _Optional[int] = ..., mean_train_loss: _Optional[float] = ..., full_model_bytes: _Optional[int] = ..., evaluation: _Optional[_Mapping[str, float]] = ..., extensions: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[RoundFailures, _Mapping]]] = ..., tiers: _Optional[_Iterable[_Union[TierCosts, _Mapping]]] = ..., label_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class TierCosts(_message.Message):
    __slots__ = ("tier", "devices", "params", "trained_params", "predicted_memory_mb", "peak_memory_mb")
    TIER_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    tier: str
    devices: int
    params: int
    trained_params: int
    predicted_memory_mb: float
    peak_memory_mb: float
    def __init__(self, tier: _Optional[str] = ..., devices: _Optional[int] = ..., params: _Optional[int] = ..., trained_params: _Optional[int] = ..., predicted_memory_mb: _Optional[float] = ..., peak_memory_mb: _Optional[float] = ...) -> None: ...

class RoundFailures(_message.Message):
    __slots__ = ("reason", "devices", "detail")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: str
    devices: int
    detail: str
    def __init__(self, reason: _Optional[str] = ..., devices: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetRoundRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("job_id", "state", "page_size", "page_token")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: RoundState
    page_size: int
    page_token: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[RoundState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRoundsReply(_message.Message):
    __slots__ = ("rounds", "next_page_token")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    next_page_token: str
    def __init__(self, rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
