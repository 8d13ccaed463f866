"""Tenant and domain records from the knowledge store, cached briefly so the hot path rarely asks.

Admin calls through this gateway invalidate entries at once; changes made elsewhere show up after
the TTL (a replaced adapter is served from the next request after that, never a stale version
mixed into one request).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from hmi.v1 import knowledge_store_pb2 as pb
from hmi.v1 import knowledge_store_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class TenantRoute:
    tenant_id: str
    labels: tuple[str, ...]
    adapter_version: int
    domain: str
    split_layer: int
    model: str = ""                     # base model; "" = the deployment's default


class TenantDirectory:
    def __init__(self, store: pb_grpc.KnowledgeStoreStub, ttl_seconds: float = 2.0) -> None:
        self.store = store
        self.ttl = ttl_seconds
        self._cache: dict[str, tuple[float, TenantRoute]] = {}
        self._domains: dict[str, tuple[float, pb.Domain]] = {}
        self._lock = threading.Lock()

    def resolve(self, tenant_id: str, timeout: float) -> TenantRoute:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(tenant_id)
        if cached and now - cached[0] < self.ttl:
            return cached[1]
        tenant = self.store.GetTenant(pb.GetTenantRequest(tenant_id=tenant_id), timeout=timeout)
        domain = self._domain(tenant.spec.domain, timeout, now)
        route = TenantRoute(tenant_id, tuple(tenant.spec.labels), tenant.adapter_version, tenant.spec.domain,
                            domain.spec.split_layer, tenant.spec.model or domain.model)
        with self._lock:
            self._cache[tenant_id] = (now, route)
        return route

    def _domain(self, name: str, timeout: float, now: float) -> pb.Domain:
        with self._lock:
            cached = self._domains.get(name)
        if cached and now - cached[0] < self.ttl:
            return cached[1]
        domain = self.store.GetDomain(pb.GetDomainRequest(name=name), timeout=timeout)
        with self._lock:
            self._domains[name] = (now, domain)
        return domain

    def invalidate(self, tenant_id: str | None = None, domain: str | None = None) -> None:
        with self._lock:
            if tenant_id is not None:
                self._cache.pop(tenant_id, None)
            if domain is not None:
                self._domains.pop(domain, None)
                for key in [k for k, (_, route) in self._cache.items() if route.domain == domain]:
                    self._cache.pop(key, None)
