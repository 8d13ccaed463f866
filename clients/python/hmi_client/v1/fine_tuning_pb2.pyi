from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileSpec(_message.Message):
    __slots__ = ("filename", "purpose", "request_id")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    filename: str
    purpose: str
    request_id: str
    def __init__(self, filename: _Optional[str] = ..., purpose: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class UploadFileRequest(_message.Message):
    __slots__ = ("spec", "data")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    spec: FileSpec
    data: bytes
    def __init__(self, spec: _Optional[_Union[FileSpec, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainingFile(_message.Message):
    __slots__ = ("id", "filename", "purpose", "bytes", "created_at", "kind", "examples", "labels", "owner")
    ID_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    kind: str
    examples: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    owner: str
    def __init__(self, id: _Optional[str] = ..., filename: _Optional[str] = ..., purpose: _Optional[str] = ..., bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., kind: _Optional[str] = ..., examples: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., owner: _Optional[str] = ...) -> None: ...

class GetFileRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListFilesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[TrainingFile]
    def __init__(self, files: _Optional[_Iterable[_Union[TrainingFile, _Mapping]]] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("epochs", "steps", "learning_rate", "batch_size", "rank", "targets", "learning_rate_multiplier")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    steps: int
    learning_rate: float
    batch_size: int
    rank: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    learning_rate_multiplier: float
    def __init__(self, epochs: _Optional[int] = ..., steps: _Optional[int] = ..., learning_rate: _Optional[float] = ..., batch_size: _Optional[int] = ..., rank: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., learning_rate_multiplier: _Optional[float] = ...) -> None: ...

class CreateJobRequest(_message.Message):
    __slots__ = ("tenant_id", "training_file", "validation_file", "hyperparameters", "seed", "new_tenant_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FILE_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NEW_TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    training_file: str
    validation_file: str
    hyperparameters: Hyperparameters
    seed: int
    new_tenant_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., training_file: _Optional[str] = ..., validation_file: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., seed: _Optional[int] = ..., new_tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class FineTuningJob(_message.Message):
    __slots__ = ("id", "tenant_id", "training_file", "validation_file", "hyperparameters", "seed", "status", "fine_tuned_model", "created_at", "started_at", "finished_at", "error", "step", "total_steps", "trained_tokens", "worker", "attempts", "result_version", "validation_accuracy", "final_loss", "kind", "model", "owner", "cancel_requested")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FILE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FILE_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNED_MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    RESULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant_id: str
    training_file: str
    validation_file: str
    hyperparameters: Hyperparameters
    seed: int
    status: str
    fine_tuned_model: str
    created_at: float
    started_at: float
    finished_at: float
    error: str
    step: int
    total_steps: int
    trained_tokens: int
    worker: str
    attempts: int
    result_version: int
    validation_accuracy: float
    final_loss: float
    kind: str
    model: str
    owner: str
    cancel_requested: bool
    def __init__(self, id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., training_file: _Optional[str] = ..., validation_file: _Optional[str] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., seed: _Optional[int] = ..., status: _Optional[str] = ..., fine_tuned_model: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., error: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., trained_tokens: _Optional[int] = ..., worker: _Optional[str] = ..., attempts: _Optional[int] = ..., result_version: _Optional[int] = ..., validation_accuracy: _Optional[float] = ..., final_loss: _Optional[float] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., owner: _Optional[str] = ..., cancel_requested: _Optional[bool] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("tenant_id", "limit", "after")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    limit: int
    after: str
    def __init__(self, tenant_id: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "has_more")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[FineTuningJob]
    has_more: bool
    def __init__(self, jobs: _Optional[_Iterable[_Union[FineTuningJob, _Mapping]]] = ..., has_more: _Optional[bool] = ...) -> None: ...

class ListJobEventsRequest(_message.Message):
    __slots__ = ("id", "after", "follow")
    ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    id: str
    after: int
    follow: bool
    def __init__(self, id: _Optional[str] = ..., after: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class FineTuningEvent(_message.Message):
    __slots__ = ("sequence", "created_at", "level", "message", "type", "step", "loss", "accuracy")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    created_at: float
    level: str
    message: str
    type: str
    step: int
    loss: float
    accuracy: float
    def __init__(self, sequence: _Optional[int] = ..., created_at: _Optional[float] = ..., level: _Optional[str] = ..., message: _Optional[str] = ..., type: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class FineTuningCheckpoint(_message.Message):
    __slots__ = ("id", "step", "loss", "created_at", "bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    step: int
    loss: float
    created_at: float
    bytes: int
    def __init__(self, id: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., created_at: _Optional[float] = ..., bytes: _Optional[int] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[FineTuningCheckpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[FineTuningCheckpoint, _Mapping]]] = ...) -> None: ...
