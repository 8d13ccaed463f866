"""Tenant and domain records from the knowledge store, cached until they change.

A background thread follows the store's change log (ListChanges as a long poll: the store answers as soon
as a change commits, else after `poll_seconds`) and forgets the tenants and domains written since, so a
cached record is served until the store says it changed: with thousands of tenants, asking the store on
every request would cost a round trip per request. The directory follows under a stable follower id, and
the store answers a write only once every live follower has read past it (bounded, see
services/knowledge_store/change_followers.py), so a tenant registered, replaced or deleted through any
gateway is served as such by every gateway from the moment the call returns. While the change log cannot
be read (store unreachable, gateway just started), records fall back to living `ttl_seconds`; one whose TTL
ran out is still served while the store cannot be reached at all, for up to `stale_if_unreachable` seconds
after it was fetched (a store that is down takes no writes, so nothing it holds can have changed; only a
gateway cut off from a store that still serves others could serve a changed tenant, for that long). Should a
request still carry an outdated version (a follower that lagged), compute answers its sequences as stale
and the gateway resolves the tenant again (servicer.py): adapter versions and domain revisions are unique
over a name's whole history, so an old version is never mistaken for the current one.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import grpc
from prometheus_client import Counter

from hmi_proto.v1 import knowledge_store_pb2 as pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as pb_grpc
from services.common.errors import HMIError
from services.common.rpc import peer_errors, peer_unreachable
from services.common.tracing import outgoing_metadata
from services.gateway.quotas import Limits

log = logging.getLogger("hmi.gateway.directory")
LOOKUPS = Counter("hmi_gateway_directory_lookups_total", "tenant records resolved", ["result"])


@dataclass(frozen=True)
class TenantRoute:
    tenant_id: str
    labels: tuple[str, ...]
    adapter_version: int
    domain: str
    split_layer: int
    model: str = ""                     # base model; "" = the deployment's default
    domain_revision: int = 0            # the domain's build the route was resolved against (0: unknown)
    limits: Limits = field(default_factory=Limits)   # the tenant's quotas and scheduling weight (quotas.py)


def route_of(tenant: pb.Tenant, domain: pb.Domain) -> TenantRoute:
    return TenantRoute(tenant.spec.tenant_id, tuple(tenant.spec.labels), tenant.adapter_version, tenant.spec.domain,
                       domain.spec.split_layer, tenant.spec.model or domain.model, domain.revision,
                       Limits.from_pb(tenant.limits))


@dataclass
class FeedState:
    """How far this directory has followed the store's change log."""
    store_id: str = ""
    revision: int = 0
    synced_at: float = float("-inf")    # monotonic time at which the last successful poll was sent
    generation: int = 0                 # bumped whenever cached records were dropped
    last_changes: int = 0               # changes in the last reply


class TenantDirectory:
    def __init__(self, store: pb_grpc.KnowledgeStoreStub, ttl_seconds: float = 2.0, *, poll_seconds: float = 0.5,
                 max_entries: int = 200_000, feed: pb_grpc.KnowledgeStoreStub | None = None,
                 stale_if_unreachable: float = 600.0, preload: int = 0) -> None:
        self.store = store
        self.preload_limit = preload      # records read in at start (`preload`), once the change log is followed
        self.stale_if_unreachable = stale_if_unreachable
        self.feed_stub = feed or store    # polled on its own connection in the service (see rpc.channel)
        self.ttl = ttl_seconds
        self.poll_seconds = poll_seconds
        self.max_entries = max_entries
        self.feed = FeedState()
        self._cache: OrderedDict[str, tuple[float, TenantRoute]] = OrderedDict()
        self._domains: dict[str, tuple[float, pb.Domain]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._preloader: threading.Thread | None = None
        self._refreshes: queue.Queue[str | None] = queue.Queue(maxsize=max(1, preload))
        self.follower_id = f"gateway-{uuid.uuid4().hex[:12]}"   # sent only while the feed thread follows
        # Other caches following the same log (the key ring): called with (kind, name) of every change, and with
        # (None, None) when everything must be forgotten (another store, or a log that no longer reaches back).
        self.listeners: list[Callable[[str | None, str | None], None]] = []

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="directory-feed", daemon=True)
        self._thread.start()
        if self.preload_limit:   # a tenant registered or changed anywhere is read in before its next request
            self.listeners.append(self._changed)
            threading.Thread(target=self._refresh, name="directory-refresh", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        try:
            self._refreshes.put_nowait(None)      # wakes the refresher; a full queue means it is busy and sees _stop
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _follow(self) -> None:
        failing = False
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sync(wait=self.poll_seconds)
                if self.preload_limit and self._preloader is None:
                    self._preloader = threading.Thread(target=self._preload_logged, name="directory-preload",
                                                       daemon=True)
                    self._preloader.start()
                if failing:
                    log.info("following the store's change log again")
                failing = False
            except grpc.RpcError as error:
                if not failing:
                    log.warning("cannot read the store's change log (%s); tenant records now expire after %.1fs",
                                error.code().name, self.ttl)
                failing = True
                self._stop.wait(self.poll_seconds)
                continue
            # The store holds a poll until something changes; one that answered at once with nothing new does
            # not hold polls (an older store): poll at intervals instead.
            if not self.feed.last_changes and time.monotonic() - started < self.poll_seconds / 4:
                self._stop.wait(self.poll_seconds)

    # ---- lookups ---------------------------------------------------------------------------

    def resolve(self, tenant_id: str, timeout: float) -> TenantRoute:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(tenant_id)
            if cached and self._fresh(cached[0], now):
                self._cache.move_to_end(tenant_id)
                LOOKUPS.labels("cached").inc()
                return cached[1]
            generation = self.feed.generation
        try:
            tenant = self.store.GetTenant(pb.GetTenantRequest(tenant_id=tenant_id), timeout=timeout,
                                          metadata=outgoing_metadata())
            domain = self._domain(tenant.spec.domain, timeout, now, generation)
        except grpc.RpcError as error:
            if cached and peer_unreachable(error) and now - cached[0] < self.stale_if_unreachable:
                LOOKUPS.labels("stale").inc()     # the store is down: what it held last is still what it holds
                return cached[1]
            with peer_errors():
                raise
        LOOKUPS.labels("fetched").inc()
        route = route_of(tenant, domain)
        with self._lock:
            if self.feed.generation == generation:   # else a change may have landed after the read: don't keep it
                self._cache[tenant_id] = (now, route)
                self._cache.move_to_end(tenant_id)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return route

    def _changed(self, kind: str | None, name: str | None) -> None:
        if kind in ("tenant", "limits") and name:
            try:
                self._refreshes.put_nowait(name)
            except queue.Full:    # a burst of registrations: the rest resolve on their first request
                pass

    def _refresh(self) -> None:
        while not self._stop.is_set():
            tenant_id = self._refreshes.get()
            if tenant_id is None:
                return
            with self._lock:
                if tenant_id in self._cache or len(self._cache) >= min(self.max_entries, self.preload_limit):
                    continue
            try:
                self.resolve(tenant_id, timeout=10.0)
            except (HMIError, grpc.RpcError):   # deleted again, or the store away: a request resolves it
                pass

    def _preload_logged(self) -> None:
        started = time.monotonic()
        try:
            loaded = self.preload(self.preload_limit)
        except grpc.RpcError as error:     # not needed for serving: requests resolve what is missing
            log.warning("preloading tenant records stopped (%s); requests fetch the rest", error.code().name)
            return
        log.info("preloaded %d tenant records in %.1fs", loaded, time.monotonic() - started)

    def preload(self, limit: int, page: int = 1000, timeout: float = 10.0) -> int:
        """Reads up to `limit` tenant records into the cache, a page at a time, so that no tenant's first request
        after a gateway start waits for a round trip to the store (at 10,000 tenants, most requests of the first
        minutes). Preloaded records go to the cold end of the LRU order and never displace one a request
        fetched. A page read while a change arrived is read again, as `resolve` would drop it. Returns the
        records loaded."""
        loaded, after, retries = 0, "", 0
        while loaded < limit and not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                generation = self.feed.generation
                room = min(limit, self.max_entries) - len(self._cache)
            if room <= 0:
                break
            reply = self.store.ListTenants(pb.ListTenantsRequest(limit=min(page, room), after=after),
                                           timeout=timeout, metadata=outgoing_metadata())
            if not reply.tenants:
                break
            domains: dict[str, pb.Domain | None] = {}
            for name in {tenant.spec.domain for tenant in reply.tenants}:
                try:
                    domains[name] = self._domain(name, timeout, now, generation)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    domains[name] = None      # deleted meanwhile: its tenants resolve (and fail) on request
            routes = [route_of(tenant, domains[tenant.spec.domain]) for tenant in reply.tenants
                      if domains[tenant.spec.domain] is not None]
            with self._lock:
                if self.feed.generation != generation:
                    retries += 1
                    if retries > 10:          # the store changes faster than a page is read: requests fill it
                        break
                    continue
                for route in routes:
                    if route.tenant_id not in self._cache:
                        self._cache[route.tenant_id] = (now, route)
                        self._cache.move_to_end(route.tenant_id, last=False)
                        loaded += 1
            retries = 0
            after = reply.tenants[-1].spec.tenant_id
        LOOKUPS.labels("preloaded").inc(loaded)
        return loaded

    def fresh(self, fetched_at: float, now: float) -> bool:
        """Whether a record fetched at `fetched_at` may still be used (the key ring follows the same rule)."""
        return self._fresh(fetched_at, now)

    def _fresh(self, fetched_at: float, now: float) -> bool:
        """Kept until changed while the change log is followed (polled within a few intervals), else the TTL."""
        following = now - self.feed.synced_at <= max(4 * self.poll_seconds, self.ttl)
        return following or now - fetched_at < self.ttl

    def _domain(self, name: str, timeout: float, now: float, generation: int) -> pb.Domain:
        with self._lock:
            cached = self._domains.get(name)
            if cached and self._fresh(cached[0], now):
                return cached[1]
        domain = self.store.GetDomain(pb.GetDomainRequest(name=name), timeout=timeout, metadata=outgoing_metadata())
        with self._lock:
            if self.feed.generation == generation:
                self._domains[name] = (now, domain)
        return domain

    # ---- invalidation ----------------------------------------------------------------------

    def sync(self, timeout: float = 5.0, wait: float = 0.0) -> int:
        """Applies the store's changes since the last poll; returns how many records were affected. With
        `wait`, the store holds the poll up to that long until a change commits."""
        sent = time.monotonic()
        first = not self.feed.store_id      # everything gets dropped anyway: one change is enough to learn the revision
        request = pb.ListChangesRequest(after_revision=self.feed.revision, limit=1 if first else 0,
                                        wait_ms=0 if first else int(wait * 1e3),
                                        follower=self.follower_id if self._thread is not None else "")
        reply = self.feed_stub.ListChanges(request, timeout=timeout + wait)
        self.feed.last_changes = len(reply.changes)
        applied = 0
        heard: list[tuple[str | None, str | None]] = []
        with self._lock:
            if reply.store_id != self.feed.store_id or not reply.complete:
                if self.feed.store_id:
                    log.warning("store change log %s; dropping %d cached tenant records",
                                "incomplete" if reply.store_id == self.feed.store_id else "belongs to another store",
                                len(self._cache))
                applied = len(self._cache) + len(self._domains)
                self._cache.clear()
                self._domains.clear()
                heard.append((None, None))
                self.feed.generation += 1
                self.feed.store_id = reply.store_id
                self.feed.revision = reply.revision
            elif reply.changes:
                for change in reply.changes:
                    applied += self._forget(change.name if change.kind in ("tenant", "limits") else None,
                                            change.name if change.kind == "domain" else None)
                    heard.append((change.kind, change.name))
                self.feed.generation += 1
                self.feed.revision = reply.changes[-1].revision
            else:
                self.feed.revision = reply.revision
            more = bool(reply.changes) and self.feed.revision < reply.revision
            if not more:
                self.feed.synced_at = sent
        for kind, name in heard:
            for listener in self.listeners:
                listener(kind, name)
        return applied + (self.sync(timeout) if more else 0)

    def invalidate(self, tenant_id: str | None = None, domain: str | None = None) -> None:
        with self._lock:
            self._forget(tenant_id, domain)
            self.feed.generation += 1

    def _forget(self, tenant_id: str | None, domain: str | None) -> int:
        dropped = 0
        if tenant_id is not None:
            dropped += self._cache.pop(tenant_id, None) is not None
        if domain is not None:
            dropped += self._domains.pop(domain, None) is not None
            for key in [k for k, (_, route) in self._cache.items() if route.domain == domain]:
                dropped += self._cache.pop(key, None) is not None
        return dropped

    def cached_tenants(self) -> int:
        with self._lock:
            return len(self._cache)
