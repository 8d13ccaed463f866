from hmi_client.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SequenceSpec(_message.Message):
    __slots__ = ("tenant_id", "adapter_version", "domain", "split_layer", "model", "domain_revision", "weight")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    adapter_version: int
    domain: str
    split_layer: int
    model: str
    domain_revision: int
    weight: float
    def __init__(self, tenant_id: _Optional[str] = ..., adapter_version: _Optional[int] = ..., domain: _Optional[str] = ..., split_layer: _Optional[int] = ..., model: _Optional[str] = ..., domain_revision: _Optional[int] = ..., weight: _Optional[float] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("token_ids", "offsets", "sequences", "want_logits", "want_embeddings")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WANT_LOGITS_FIELD_NUMBER: _ClassVar[int]
    WANT_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _tensor_pb2.Tensor
    offsets: _containers.RepeatedScalarFieldContainer[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceSpec]
    want_logits: bool
    want_embeddings: bool
    def __init__(self, token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., offsets: _Optional[_Iterable[int]] = ..., sequences: _Optional[_Iterable[_Union[SequenceSpec, _Mapping]]] = ..., want_logits: _Optional[bool] = ..., want_embeddings: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("logits", "logit_offsets", "embeddings", "queue_ms", "fetch_ms", "execute_ms", "failures")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    FETCH_MS_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_MS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    logit_offsets: _containers.RepeatedScalarFieldContainer[int]
    embeddings: _tensor_pb2.Tensor
    queue_ms: float
    fetch_ms: float
    execute_ms: float
    failures: _containers.RepeatedCompositeFieldContainer[SequenceFailure]
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., logit_offsets: _Optional[_Iterable[int]] = ..., embeddings: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., queue_ms: _Optional[float] = ..., fetch_ms: _Optional[float] = ..., execute_ms: _Optional[float] = ..., failures: _Optional[_Iterable[_Union[SequenceFailure, _Mapping]]] = ...) -> None: ...

class SequenceFailure(_message.Message):
    __slots__ = ("index", "code", "message", "stale")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    index: int
    code: str
    message: str
    stale: bool
    def __init__(self, index: _Optional[int] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., stale: _Optional[bool] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids", "logprobs", "top_logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty", "kv_budget", "output_pattern")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATTERN_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: bool
    top_logprobs: int
    prompt_logprobs: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    kv_budget: int
    output_pattern: str
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., kv_budget: _Optional[int] = ..., output_pattern: _Optional[str] = ...) -> None: ...

class SampledLogprob(_message.Message):
    __slots__ = ("logprob", "top_ids", "top_logprobs")
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprob: float
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, logprob: _Optional[float] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("sequence", "prompt_ids", "params")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    sequence: SequenceSpec
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    def __init__(self, sequence: _Optional[_Union[SequenceSpec, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "logprobs", "prompt_logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    logprobs: _containers.RepeatedCompositeFieldContainer[SampledLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[SampledLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[SampledLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[SampledLogprob, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("batches", "sequences", "tokens", "adapter_hits_device", "adapter_hits_host", "adapter_misses", "device_slots", "device_slots_used", "host_cache_bytes", "device", "model", "plot_hit_depths", "io_seconds", "io_hidden_seconds", "generation_steps", "generated_tokens", "generating", "generation_waiting", "kv_bytes_used", "kv_budget_bytes")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HITS_DEVICE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HITS_HOST_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MISSES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLOT_HIT_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    IO_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IO_HIDDEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATING_FIELD_NUMBER: _ClassVar[int]
    GENERATION_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    batches: int
    sequences: int
    tokens: int
    adapter_hits_device: int
    adapter_hits_host: int
    adapter_misses: int
    device_slots: int
    device_slots_used: int
    host_cache_bytes: int
    device: str
    model: str
    plot_hit_depths: _containers.RepeatedScalarFieldContainer[int]
    io_seconds: float
    io_hidden_seconds: float
    generation_steps: int
    generated_tokens: int
    generating: int
    generation_waiting: int
    kv_bytes_used: int
    kv_budget_bytes: int
    def __init__(self, batches: _Optional[int] = ..., sequences: _Optional[int] = ..., tokens: _Optional[int] = ..., adapter_hits_device: _Optional[int] = ..., adapter_hits_host: _Optional[int] = ..., adapter_misses: _Optional[int] = ..., device_slots: _Optional[int] = ..., device_slots_used: _Optional[int] = ..., host_cache_bytes: _Optional[int] = ..., device: _Optional[str] = ..., model: _Optional[str] = ..., plot_hit_depths: _Optional[_Iterable[int]] = ..., io_seconds: _Optional[float] = ..., io_hidden_seconds: _Optional[float] = ..., generation_steps: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., generating: _Optional[int] = ..., generation_waiting: _Optional[int] = ..., kv_bytes_used: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ...) -> None: ...
