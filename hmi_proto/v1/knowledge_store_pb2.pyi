from hmi_client.v1 import catalog_pb2 as _catalog_pb2
from hmi_client.v1 import tensor_pb2 as _tensor_pb2
from hmi_client.v1 import fine_tuning_pb2 as _fine_tuning_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union
from hmi_client.v1.catalog_pb2 import DomainSpec as DomainSpec
from hmi_client.v1.catalog_pb2 import BridgeSettings as BridgeSettings
from hmi_client.v1.catalog_pb2 import BridgeReport as BridgeReport
from hmi_client.v1.catalog_pb2 import Domain as Domain
from hmi_client.v1.catalog_pb2 import AdaptSettings as AdaptSettings
from hmi_client.v1.catalog_pb2 import AdaptReport as AdaptReport
from hmi_client.v1.catalog_pb2 import AdaptDomainRequest as AdaptDomainRequest
from hmi_client.v1.catalog_pb2 import BuildDomainRequest as BuildDomainRequest
from hmi_client.v1.catalog_pb2 import BuildDomainProgress as BuildDomainProgress
from hmi_client.v1.catalog_pb2 import GetDomainRequest as GetDomainRequest
from hmi_client.v1.catalog_pb2 import ListDomainsRequest as ListDomainsRequest
from hmi_client.v1.catalog_pb2 import ListDomainsResponse as ListDomainsResponse
from hmi_client.v1.catalog_pb2 import DeleteDomainRequest as DeleteDomainRequest
from hmi_client.v1.catalog_pb2 import DeleteDomainResponse as DeleteDomainResponse
from hmi_client.v1.catalog_pb2 import LookupRequest as LookupRequest
from hmi_client.v1.catalog_pb2 import LookupHeader as LookupHeader
from hmi_client.v1.catalog_pb2 import LookupResponse as LookupResponse
from hmi_client.v1.catalog_pb2 import TenantSpec as TenantSpec
from hmi_client.v1.catalog_pb2 import Tenant as Tenant
from hmi_client.v1.catalog_pb2 import PutTenantRequest as PutTenantRequest
from hmi_client.v1.catalog_pb2 import GetTenantRequest as GetTenantRequest
from hmi_client.v1.catalog_pb2 import ListTenantsRequest as ListTenantsRequest
from hmi_client.v1.catalog_pb2 import ListTenantsResponse as ListTenantsResponse
from hmi_client.v1.catalog_pb2 import DeleteTenantRequest as DeleteTenantRequest
from hmi_client.v1.catalog_pb2 import DeleteTenantResponse as DeleteTenantResponse
from hmi_client.v1.catalog_pb2 import GetAdapterRequest as GetAdapterRequest
from hmi_client.v1.catalog_pb2 import GetBridgeRequest as GetBridgeRequest
from hmi_client.v1.catalog_pb2 import BackupRequest as BackupRequest
from hmi_client.v1.catalog_pb2 import BackupResponse as BackupResponse
from hmi_client.v1.catalog_pb2 import TenantLimits as TenantLimits
from hmi_client.v1.catalog_pb2 import SetTenantLimitsRequest as SetTenantLimitsRequest
from hmi_client.v1.catalog_pb2 import GetTenantLimitsRequest as GetTenantLimitsRequest
from hmi_client.v1.catalog_pb2 import ApiKey as ApiKey
from hmi_client.v1.catalog_pb2 import CreateKeyRequest as CreateKeyRequest
from hmi_client.v1.catalog_pb2 import CreateKeyResponse as CreateKeyResponse
from hmi_client.v1.catalog_pb2 import ListKeysRequest as ListKeysRequest
from hmi_client.v1.catalog_pb2 import ListKeysResponse as ListKeysResponse
from hmi_client.v1.catalog_pb2 import RevokeKeyRequest as RevokeKeyRequest

DESCRIPTOR: _descriptor.FileDescriptor

class ClaimJobRequest(_message.Message):
    __slots__ = ("model", "worker", "lease_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker: str
    lease_seconds: float
    def __init__(self, model: _Optional[str] = ..., worker: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class ClaimJobResponse(_message.Message):
    __slots__ = ("found", "job")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    found: bool
    job: _fine_tuning_pb2.FineTuningJob
    def __init__(self, found: _Optional[bool] = ..., job: _Optional[_Union[_fine_tuning_pb2.FineTuningJob, _Mapping]] = ...) -> None: ...

class ReportJobRequest(_message.Message):
    __slots__ = ("id", "worker", "step", "total_steps", "trained_tokens", "lease_seconds", "events", "checkpoint", "checkpoint_loss")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_LOSS_FIELD_NUMBER: _ClassVar[int]
    id: str
    worker: str
    step: int
    total_steps: int
    trained_tokens: int
    lease_seconds: float
    events: _containers.RepeatedCompositeFieldContainer[_fine_tuning_pb2.FineTuningEvent]
    checkpoint: bytes
    checkpoint_loss: float
    def __init__(self, id: _Optional[str] = ..., worker: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., trained_tokens: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., events: _Optional[_Iterable[_Union[_fine_tuning_pb2.FineTuningEvent, _Mapping]]] = ..., checkpoint: _Optional[bytes] = ..., checkpoint_loss: _Optional[float] = ...) -> None: ...

class FinishJobRequest(_message.Message):
    __slots__ = ("id", "worker", "adapter", "error", "cancelled", "validation_accuracy", "final_loss", "trained_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    FINAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    worker: str
    adapter: bytes
    error: str
    cancelled: bool
    validation_accuracy: float
    final_loss: float
    trained_tokens: int
    def __init__(self, id: _Optional[str] = ..., worker: _Optional[str] = ..., adapter: _Optional[bytes] = ..., error: _Optional[str] = ..., cancelled: _Optional[bool] = ..., validation_accuracy: _Optional[float] = ..., final_loss: _Optional[float] = ..., trained_tokens: _Optional[int] = ...) -> None: ...

class GetKeyVerifierRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class KeyVerifier(_message.Message):
    __slots__ = ("key", "salt", "hash", "n", "r", "p")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    key: _catalog_pb2.ApiKey
    salt: bytes
    hash: bytes
    n: int
    r: int
    p: int
    def __init__(self, key: _Optional[_Union[_catalog_pb2.ApiKey, _Mapping]] = ..., salt: _Optional[bytes] = ..., hash: _Optional[bytes] = ..., n: _Optional[int] = ..., r: _Optional[int] = ..., p: _Optional[int] = ...) -> None: ...

class ListChangesRequest(_message.Message):
    __slots__ = ("after_revision", "limit", "wait_ms", "follower")
    AFTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    FOLLOWER_FIELD_NUMBER: _ClassVar[int]
    after_revision: int
    limit: int
    wait_ms: int
    follower: str
    def __init__(self, after_revision: _Optional[int] = ..., limit: _Optional[int] = ..., wait_ms: _Optional[int] = ..., follower: _Optional[str] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("revision", "kind", "name")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    revision: int
    kind: str
    name: str
    def __init__(self, revision: _Optional[int] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListChangesResponse(_message.Message):
    __slots__ = ("store_id", "revision", "changes", "complete")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    revision: int
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    complete: bool
    def __init__(self, store_id: _Optional[str] = ..., revision: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ..., complete: _Optional[bool] = ...) -> None: ...

class TenantDemand(_message.Message):
    __slots__ = ("tenant_id", "requests_per_second")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    requests_per_second: float
    def __init__(self, tenant_id: _Optional[str] = ..., requests_per_second: _Optional[float] = ...) -> None: ...

class ShareLimitsRequest(_message.Message):
    __slots__ = ("gateway_id", "demand")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    DEMAND_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    demand: _containers.RepeatedCompositeFieldContainer[TenantDemand]
    def __init__(self, gateway_id: _Optional[str] = ..., demand: _Optional[_Iterable[_Union[TenantDemand, _Mapping]]] = ...) -> None: ...

class TenantShare(_message.Message):
    __slots__ = ("tenant_id", "share")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    share: float
    def __init__(self, tenant_id: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class ShareLimitsResponse(_message.Message):
    __slots__ = ("gateways", "shares")
    GATEWAYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    gateways: int
    shares: _containers.RepeatedCompositeFieldContainer[TenantShare]
    def __init__(self, gateways: _Optional[int] = ..., shares: _Optional[_Iterable[_Union[TenantShare, _Mapping]]] = ...) -> None: ...

class RecordTrafficRequest(_message.Message):
    __slots__ = ("domain", "domain_revision", "paths", "owners", "counts")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_REVISION_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    domain_revision: int
    paths: _tensor_pb2.Tensor
    owners: bytes
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, domain: _Optional[str] = ..., domain_revision: _Optional[int] = ..., paths: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., owners: _Optional[bytes] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class RecordTrafficResponse(_message.Message):
    __slots__ = ("tree_stamp",)
    TREE_STAMP_FIELD_NUMBER: _ClassVar[int]
    tree_stamp: str
    def __init__(self, tree_stamp: _Optional[str] = ...) -> None: ...
