from hmi_client.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DomainSpec(_message.Message):
    __slots__ = ("name", "parent", "split_layer", "context", "min_count", "budget_bytes", "learn_threshold", "no_position_offsets", "model", "request_id", "no_bridge", "bridge")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    MIN_COUNT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEARN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NO_POSITION_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NO_BRIDGE_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    parent: str
    split_layer: int
    context: int
    min_count: int
    budget_bytes: int
    learn_threshold: int
    no_position_offsets: bool
    model: str
    request_id: str
    no_bridge: bool
    bridge: BridgeSettings
    def __init__(self, name: _Optional[str] = ..., parent: _Optional[str] = ..., split_layer: _Optional[int] = ..., context: _Optional[int] = ..., min_count: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., learn_threshold: _Optional[int] = ..., no_position_offsets: _Optional[bool] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., no_bridge: _Optional[bool] = ..., bridge: _Optional[_Union[BridgeSettings, _Mapping]] = ...) -> None: ...

class BridgeSettings(_message.Message):
    __slots__ = ("steps", "batch_size", "learning_rate", "heads", "head_dim", "ffn", "seed", "max_tokens")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    FFN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    learning_rate: float
    heads: int
    head_dim: int
    ffn: int
    seed: int
    max_tokens: int
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., ffn: _Optional[int] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class BridgeReport(_message.Message):
    __slots__ = ("revision", "heads", "head_dim", "ffn", "steps", "sequences", "tokens", "loss_before", "loss_after", "seconds", "cost_in_layers", "bytes")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    FFN_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    COST_IN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    revision: int
    heads: int
    head_dim: int
    ffn: int
    steps: int
    sequences: int
    tokens: int
    loss_before: float
    loss_after: float
    seconds: float
    cost_in_layers: float
    bytes: int
    def __init__(self, revision: _Optional[int] = ..., heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., ffn: _Optional[int] = ..., steps: _Optional[int] = ..., sequences: _Optional[int] = ..., tokens: _Optional[int] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., seconds: _Optional[float] = ..., cost_in_layers: _Optional[float] = ..., bytes: _Optional[int] = ...) -> None: ...

class Domain(_message.Message):
    __slots__ = ("spec", "model", "hidden_size", "nodes", "nodes_per_depth", "plot_bytes", "corpus_sequences", "corpus_tokens", "built_at", "lower_model", "budget_bytes", "learn_threshold", "materialized_nodes", "pruned_nodes", "pending_contexts", "recent_hit_depths", "adapt", "position_offsets", "revision", "bridge")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    NODES_PER_DEPTH_FIELD_NUMBER: _ClassVar[int]
    PLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CORPUS_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    CORPUS_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BUILT_AT_FIELD_NUMBER: _ClassVar[int]
    LOWER_MODEL_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEARN_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MATERIALIZED_NODES_FIELD_NUMBER: _ClassVar[int]
    PRUNED_NODES_FIELD_NUMBER: _ClassVar[int]
    PENDING_CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    RECENT_HIT_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    ADAPT_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_FIELD_NUMBER: _ClassVar[int]
    spec: DomainSpec
    model: str
    hidden_size: int
    nodes: int
    nodes_per_depth: _containers.RepeatedScalarFieldContainer[int]
    plot_bytes: int
    corpus_sequences: int
    corpus_tokens: int
    built_at: float
    lower_model: str
    budget_bytes: int
    learn_threshold: int
    materialized_nodes: int
    pruned_nodes: int
    pending_contexts: int
    recent_hit_depths: _containers.RepeatedScalarFieldContainer[int]
    adapt: AdaptReport
    position_offsets: bool
    revision: int
    bridge: BridgeReport
    def __init__(self, spec: _Optional[_Union[DomainSpec, _Mapping]] = ..., model: _Optional[str] = ..., hidden_size: _Optional[int] = ..., nodes: _Optional[int] = ..., nodes_per_depth: _Optional[_Iterable[int]] = ..., plot_bytes: _Optional[int] = ..., corpus_sequences: _Optional[int] = ..., corpus_tokens: _Optional[int] = ..., built_at: _Optional[float] = ..., lower_model: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., learn_threshold: _Optional[int] = ..., materialized_nodes: _Optional[int] = ..., pruned_nodes: _Optional[int] = ..., pending_contexts: _Optional[int] = ..., recent_hit_depths: _Optional[_Iterable[int]] = ..., adapt: _Optional[_Union[AdaptReport, _Mapping]] = ..., position_offsets: _Optional[bool] = ..., revision: _Optional[int] = ..., bridge: _Optional[_Union[BridgeReport, _Mapping]] = ...) -> None: ...

class AdaptSettings(_message.Message):
    __slots__ = ("steps", "batch_size", "learning_rate", "seed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    def __init__(self, steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class AdaptReport(_message.Message):
    __slots__ = ("steps", "corpus_sequences", "base_loss", "adapted_loss", "seconds")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CORPUS_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BASE_LOSS_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    corpus_sequences: int
    base_loss: float
    adapted_loss: float
    seconds: float
    def __init__(self, steps: _Optional[int] = ..., corpus_sequences: _Optional[int] = ..., base_loss: _Optional[float] = ..., adapted_loss: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

class AdaptDomainRequest(_message.Message):
    __slots__ = ("spec", "corpus_chunk", "settings")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CORPUS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    spec: DomainSpec
    corpus_chunk: bytes
    settings: AdaptSettings
    def __init__(self, spec: _Optional[_Union[DomainSpec, _Mapping]] = ..., corpus_chunk: _Optional[bytes] = ..., settings: _Optional[_Union[AdaptSettings, _Mapping]] = ...) -> None: ...

class BuildDomainRequest(_message.Message):
    __slots__ = ("spec", "corpus_chunk")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CORPUS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    spec: DomainSpec
    corpus_chunk: bytes
    def __init__(self, spec: _Optional[_Union[DomainSpec, _Mapping]] = ..., corpus_chunk: _Optional[bytes] = ...) -> None: ...

class BuildDomainProgress(_message.Message):
    __slots__ = ("stage", "done", "total", "domain", "loss")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    domain: Domain
    loss: float
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., domain: _Optional[_Union[Domain, _Mapping]] = ..., loss: _Optional[float] = ...) -> None: ...

class GetDomainRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDomainsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDomainsResponse(_message.Message):
    __slots__ = ("domains",)
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    domains: _containers.RepeatedCompositeFieldContainer[Domain]
    def __init__(self, domains: _Optional[_Iterable[_Union[Domain, _Mapping]]] = ...) -> None: ...

class DeleteDomainRequest(_message.Message):
    __slots__ = ("name", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    request_id: str
    def __init__(self, name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteDomainResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("domain", "token_ids", "offsets", "first_positions", "context_tokens", "domain_revision", "raw_rows", "known_stamp")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    RAW_ROWS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_STAMP_FIELD_NUMBER: _ClassVar[int]
    domain: str
    token_ids: _tensor_pb2.Tensor
    offsets: _containers.RepeatedScalarFieldContainer[int]
    first_positions: _containers.RepeatedScalarFieldContainer[int]
    context_tokens: _containers.RepeatedScalarFieldContainer[int]
    domain_revision: int
    raw_rows: bool
    known_stamp: str
    def __init__(self, domain: _Optional[str] = ..., token_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., offsets: _Optional[_Iterable[int]] = ..., first_positions: _Optional[_Iterable[int]] = ..., context_tokens: _Optional[_Iterable[int]] = ..., domain_revision: _Optional[int] = ..., raw_rows: _Optional[bool] = ..., known_stamp: _Optional[str] = ...) -> None: ...

class LookupHeader(_message.Message):
    __slots__ = ("dtype", "shape", "split_layer", "hit_depth_counts", "bridge_revision", "tree_stamp", "context", "token_depths", "token_owners", "learning")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    HIT_DEPTH_COUNTS_FIELD_NUMBER: _ClassVar[int]
    BRIDGE_REVISION_FIELD_NUMBER: _ClassVar[int]
    TREE_STAMP_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DEPTHS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OWNERS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    split_layer: int
    hit_depth_counts: _containers.RepeatedScalarFieldContainer[int]
    bridge_revision: int
    tree_stamp: str
    context: int
    token_depths: bytes
    token_owners: bytes
    learning: bool
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., split_layer: _Optional[int] = ..., hit_depth_counts: _Optional[_Iterable[int]] = ..., bridge_revision: _Optional[int] = ..., tree_stamp: _Optional[str] = ..., context: _Optional[int] = ..., token_depths: _Optional[bytes] = ..., token_owners: _Optional[bytes] = ..., learning: _Optional[bool] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("header", "chunk", "offsets_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: LookupHeader
    chunk: bytes
    offsets_chunk: bytes
    def __init__(self, header: _Optional[_Union[LookupHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ..., offsets_chunk: _Optional[bytes] = ...) -> None: ...

class TenantSpec(_message.Message):
    __slots__ = ("tenant_id", "domain", "labels", "rank", "seed", "model", "request_id", "has_adapter")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HAS_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    domain: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    rank: int
    seed: int
    model: str
    request_id: str
    has_adapter: bool
    def __init__(self, tenant_id: _Optional[str] = ..., domain: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., rank: _Optional[int] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., has_adapter: _Optional[bool] = ...) -> None: ...

class Tenant(_message.Message):
    __slots__ = ("spec", "adapter_version", "adapter_bytes", "rank", "targets", "layers", "updated_at", "split_layer", "limits")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    SPLIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    spec: TenantSpec
    adapter_version: int
    adapter_bytes: int
    rank: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedScalarFieldContainer[int]
    updated_at: float
    split_layer: int
    limits: TenantLimits
    def __init__(self, spec: _Optional[_Union[TenantSpec, _Mapping]] = ..., adapter_version: _Optional[int] = ..., adapter_bytes: _Optional[int] = ..., rank: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[int]] = ..., updated_at: _Optional[float] = ..., split_layer: _Optional[int] = ..., limits: _Optional[_Union[TenantLimits, _Mapping]] = ...) -> None: ...

class PutTenantRequest(_message.Message):
    __slots__ = ("spec", "adapter_chunk")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    spec: TenantSpec
    adapter_chunk: bytes
    def __init__(self, spec: _Optional[_Union[TenantSpec, _Mapping]] = ..., adapter_chunk: _Optional[bytes] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("domain", "limit", "after")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    domain: str
    limit: int
    after: str
    def __init__(self, domain: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "total")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    total: int
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("tenant_id", "request_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("tenant_id", "version")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    version: int
    def __init__(self, tenant_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetBridgeRequest(_message.Message):
    __slots__ = ("domain", "revision")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    domain: str
    revision: int
    def __init__(self, domain: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class BackupResponse(_message.Message):
    __slots__ = ("path", "bytes", "revision", "seconds")
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    path: str
    bytes: int
    revision: int
    seconds: float
    def __init__(self, path: _Optional[str] = ..., bytes: _Optional[int] = ..., revision: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class TenantLimits(_message.Message):
    __slots__ = ("tenant_id", "rps", "tps", "max_concurrent", "max_queued", "priority")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    RPS_FIELD_NUMBER: _ClassVar[int]
    TPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    rps: float
    tps: float
    max_concurrent: int
    max_queued: int
    priority: int
    def __init__(self, tenant_id: _Optional[str] = ..., rps: _Optional[float] = ..., tps: _Optional[float] = ..., max_concurrent: _Optional[int] = ..., max_queued: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class SetTenantLimitsRequest(_message.Message):
    __slots__ = ("limits",)
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    limits: TenantLimits
    def __init__(self, limits: _Optional[_Union[TenantLimits, _Mapping]] = ...) -> None: ...

class GetTenantLimitsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "tenants", "tenant_admin", "domains", "description", "created_at", "expires_at", "revoked_at", "rps", "tps", "max_concurrent")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_ADMIN_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    RPS_FIELD_NUMBER: _ClassVar[int]
    TPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenants: _containers.RepeatedScalarFieldContainer[str]
    tenant_admin: bool
    domains: _containers.RepeatedScalarFieldContainer[str]
    description: str
    created_at: float
    expires_at: float
    revoked_at: float
    rps: float
    tps: float
    max_concurrent: int
    def __init__(self, id: _Optional[str] = ..., tenants: _Optional[_Iterable[str]] = ..., tenant_admin: _Optional[bool] = ..., domains: _Optional[_Iterable[str]] = ..., description: _Optional[str] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., revoked_at: _Optional[float] = ..., rps: _Optional[float] = ..., tps: _Optional[float] = ..., max_concurrent: _Optional[int] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("tenants", "tenant_admin", "domains", "expires_in_seconds", "description", "rps", "tps", "max_concurrent")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_ADMIN_FIELD_NUMBER: _ClassVar[int]
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RPS_FIELD_NUMBER: _ClassVar[int]
    TPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedScalarFieldContainer[str]
    tenant_admin: bool
    domains: _containers.RepeatedScalarFieldContainer[str]
    expires_in_seconds: float
    description: str
    rps: float
    tps: float
    max_concurrent: int
    def __init__(self, tenants: _Optional[_Iterable[str]] = ..., tenant_admin: _Optional[bool] = ..., domains: _Optional[_Iterable[str]] = ..., expires_in_seconds: _Optional[float] = ..., description: _Optional[str] = ..., rps: _Optional[float] = ..., tps: _Optional[float] = ..., max_concurrent: _Optional[int] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...
