"""Domains, tenants, keys, limits and backups: proxied to the knowledge store with the caller's scope, keeping the
tenant directory fresh. Domains, keys, limits and backups are the admin's, tenants are their keys' (access.py).

The records are the store's own messages (knowledge_store.proto): the core passes them on, it does not copy
them into types of its own."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterable, Iterator

from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as store_grpc
from services.common import tracing
from services.common.decoding import UndecodableRequest
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.rpc import peer_errors
from services.gateway.access import REFUSED, Access, Principal
from services.gateway.core.call import Call
from services.gateway.core.inference import open_access
from services.gateway.directory import TenantDirectory

ADMIN_TIMEOUT = 60.0
BUILD_TIMEOUT = 6 * 3600.0
MAX_SCOPES_CACHED = 10_000


class _CallersUndecodableMessages(logging.Filter):
    """gRPC's client logs "Exception iterating requests!" with a traceback when the iterator of a stream it
    sends raises. A relayed stream's iterator raises for a message of the caller's that does not parse: the
    caller's error, answered INVALID_ARGUMENT, not a fault of ours to log as one."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, UndecodableRequest)


logging.getLogger("grpc._channel").addFilter(_CallersUndecodableMessages())


class Relayed:
    """A client stream passed on to the store. When one of its messages does not parse, the call to the store is
    cancelled (the store so never sees half a stream); `error` then holds the real reason."""

    def __init__(self, requests: Iterable) -> None:
        self._requests = iter(requests)
        self._first: list = []
        self.error: UndecodableRequest | None = None

    def __iter__(self) -> "Relayed":
        return self

    def __next__(self):
        if self._first:
            return self._first.pop()
        try:
            return next(self._requests)
        except UndecodableRequest as error:
            self.error = error
            raise

    @contextmanager
    def answered(self) -> Iterator[None]:
        """Around the store call the stream is passed to: the store's statuses as HMIErrors, and when one of the
        caller's messages did not parse (so the call was cancelled), that as the answer."""
        try:
            with peer_errors():
                yield
        except Exception:
            if self.error is not None:
                raise self.error from None
            raise

    def first(self):
        """The first message (None for an empty stream), still passed on with the rest."""
        if not self._first:
            message = next(self, None)
            if message is None:
                return None
            self._first.append(message)
        return self._first[0]


class Admin:
    def __init__(self, store: store_grpc.KnowledgeStoreStub, directory: TenantDirectory,
                 access: Access | None = None) -> None:
        self.store = store
        self.directory = directory
        self.access = access or open_access()
        self._domain_scopes: dict[str, tuple[int, frozenset[str]]] = {}

    def principal(self, call: Call) -> Principal:
        return self.access.principal_of(call.credential)

    def _admin(self, call: Call, what: str) -> None:
        self.principal(call).require_admin(what)

    @staticmethod
    def _options(call: Call, default_timeout: float = ADMIN_TIMEOUT) -> dict:
        """The caller's deadline, request id and trace context, for the store call an admin call becomes."""
        return {"timeout": call.timeout(default_timeout), "metadata": tracing.outgoing_metadata()}

    @staticmethod
    def _streamed(stream) -> Iterator:
        with peer_errors():
            yield from stream

    # ---- domains --------------------------------------------------------------------------------

    def _visible_domains(self, principal: Principal, call: Call) -> frozenset[str]:
        """A key's domains: those it names and those its registered tenants belong to (cached until a tenant
        or domain changes)."""
        generation = self.directory.feed.generation
        cached = self._domain_scopes.get(principal.name)
        if cached is not None and cached[0] == generation:
            return cached[1]
        domains = set(principal.domains)
        for tenant in self._tenants(call):
            if principal.covers(tenant.spec.tenant_id):
                domains.add(tenant.spec.domain)
        visible = frozenset(domains)
        if len(self._domain_scopes) >= MAX_SCOPES_CACHED:
            self._domain_scopes.clear()
        self._domain_scopes[principal.name] = (generation, visible)
        return visible

    def _require_domain(self, principal: Principal, domain: str, what: str, call: Call) -> None:
        if principal.admin:
            return
        if domain not in self._visible_domains(principal, call):
            REFUSED.labels("permission_denied").inc()
            raise PermissionDenied(f"{what} in domain {domain!r}: {principal.name} reaches only the domains its "
                                   f"tenants belong to and those it was made with (hmi key create --domains)")

    def build_domain(self, call: Call, requests: Iterable) -> Iterator[store_pb.BuildDomainProgress]:
        self._admin(call, "BuildDomain")
        yield from self._job(self.store.BuildDomain, requests, call)

    def adapt_domain(self, call: Call, requests: Iterable) -> Iterator[store_pb.BuildDomainProgress]:
        self._admin(call, "AdaptDomain")
        yield from self._job(self.store.AdaptDomain, requests, call)

    def _job(self, method, requests: Iterable, call: Call) -> Iterator[store_pb.BuildDomainProgress]:
        relayed = Relayed(requests)
        with relayed.answered():
            for progress in method(relayed, **self._options(call, BUILD_TIMEOUT)):
                if progress.stage == "done":
                    self.directory.invalidate(domain=progress.domain.spec.name)
                yield progress

    def get_domain(self, call: Call, request: store_pb.GetDomainRequest) -> store_pb.Domain:
        self._require_domain(self.principal(call), request.name, "GetDomain", call)
        with peer_errors():
            return self.store.GetDomain(request, **self._options(call))

    def list_domains(self, call: Call, request: store_pb.ListDomainsRequest) -> store_pb.ListDomainsResponse:
        principal = self.principal(call)
        with peer_errors():
            reply = self.store.ListDomains(request, **self._options(call))
        if principal.admin:
            return reply
        visible = self._visible_domains(principal, call)
        return store_pb.ListDomainsResponse(domains=[d for d in reply.domains if d.spec.name in visible])

    def delete_domain(self, call: Call, request: store_pb.DeleteDomainRequest):
        self._admin(call, "DeleteDomain")
        with peer_errors():
            response = self.store.DeleteDomain(request, **self._options(call))
        self.directory.invalidate(domain=request.name)
        return response

    def lookup(self, call: Call, request: store_pb.LookupRequest) -> Iterator[store_pb.LookupResponse]:
        principal = self.principal(call)
        principal.require_tenant_admin("Lookup (PLOT vectors, what training reads)")
        self._require_domain(principal, request.domain, "Lookup", call)
        yield from self._streamed(self.store.Lookup(request, **self._options(call)))

    # ---- tenants --------------------------------------------------------------------------------

    def register_tenant(self, call: Call, requests: Iterable) -> store_pb.Tenant:
        principal = self.principal(call)
        relayed = Relayed(requests)
        if not principal.admin:
            first = relayed.first()
            if first is None or first.WhichOneof("item") != "spec":
                raise InvalidArgument("the stream must start with the tenant's spec")
            principal.require_tenant(first.spec.tenant_id, "RegisterTenant", manage=True)
            self._require_domain(principal, first.spec.domain, "RegisterTenant", call)
        with relayed.answered():
            tenant = self.store.PutTenant(relayed, **self._options(call))
        self.directory.invalidate(tenant_id=tenant.spec.tenant_id)
        return tenant

    def get_tenant(self, call: Call, request: store_pb.GetTenantRequest) -> store_pb.Tenant:
        self.principal(call).require_tenant(request.tenant_id, "GetTenant")
        with peer_errors():
            return self.store.GetTenant(request, **self._options(call))

    def _tenants(self, call: Call, domain: str = "") -> list[store_pb.Tenant]:
        with peer_errors():
            return list(self.store.ListTenants(store_pb.ListTenantsRequest(domain=domain),
                                               **self._options(call)).tenants)

    def list_tenants(self, call: Call, request: store_pb.ListTenantsRequest) -> store_pb.ListTenantsResponse:
        principal = self.principal(call)
        if principal.admin:
            with peer_errors():
                return self.store.ListTenants(request, **self._options(call))
        if request.limit < 0:
            raise InvalidArgument("limit must be >= 0")
        mine = [t for t in self._tenants(call, request.domain) if principal.covers(t.spec.tenant_id)]
        page = [t for t in mine if t.spec.tenant_id > request.after]
        return store_pb.ListTenantsResponse(tenants=page[:request.limit] if request.limit else page, total=len(mine))

    def get_adapter(self, call: Call, request: store_pb.GetAdapterRequest) -> Iterator:
        self.principal(call).require_tenant(request.tenant_id, "GetAdapter (exporting its weights)", manage=True)
        yield from self._streamed(self.store.GetAdapter(request, **self._options(call)))

    def get_bridge(self, call: Call, request: store_pb.GetBridgeRequest) -> Iterator:
        principal = self.principal(call)        # like Lookup: what training applies to the PLOT rows it reads
        principal.require_tenant_admin("GetBridge (a domain's bridge, what training reads)")
        self._require_domain(principal, request.domain, "GetBridge", call)
        yield from self._streamed(self.store.GetBridge(request, **self._options(call)))

    def delete_tenant(self, call: Call, request: store_pb.DeleteTenantRequest):
        self.principal(call).require_tenant(request.tenant_id, "DeleteTenant", manage=True)
        with peer_errors():
            response = self.store.DeleteTenant(request, **self._options(call))
        self.directory.invalidate(tenant_id=request.tenant_id)
        return response

    # ---- the store, keys and limits: the admin's ---------------------------------------------

    def backup(self, call: Call, request: store_pb.BackupRequest):
        self._admin(call, "Backup")
        with peer_errors():
            return self.store.Backup(request, **self._options(call, BUILD_TIMEOUT))

    def create_key(self, call: Call, request: store_pb.CreateKeyRequest):
        self._admin(call, "CreateKey")
        with peer_errors():
            return self.store.CreateKey(request, **self._options(call))

    def list_keys(self, call: Call, request: store_pb.ListKeysRequest):
        self._admin(call, "ListKeys")
        with peer_errors():
            return self.store.ListKeys(request, **self._options(call))

    def revoke_key(self, call: Call, request: store_pb.RevokeKeyRequest):
        self._admin(call, "RevokeKey")
        with peer_errors():
            return self.store.RevokeKey(request, **self._options(call))

    def set_tenant_limits(self, call: Call, request: store_pb.SetTenantLimitsRequest) -> store_pb.TenantLimits:
        self._admin(call, "SetTenantLimits")
        with peer_errors():
            limits = self.store.SetTenantLimits(request, **self._options(call))
        self.directory.invalidate(tenant_id=limits.tenant_id)
        return limits

    def get_tenant_limits(self, call: Call, request: store_pb.GetTenantLimitsRequest) -> store_pb.TenantLimits:
        self.principal(call).require_tenant(request.tenant_id, "GetTenantLimits")
        with peer_errors():
            return self.store.GetTenantLimits(request, **self._options(call))
