"""Prometheus metrics shared by every service: calls by method and status code, their latency, calls in
progress; a bounded set of tenant label values; collectors that read a service's state when scraped; the
metrics HTTP endpoint (`--metrics-port`). The README lists every metric and what it means."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterable, Iterator

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from services.common.errors import HMIError
from services.common.health import is_health_method
from services.common.interception import run_inside

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CALLS = Counter("hmi_requests_total", "gRPC calls answered, by service, method and status code",
                ["service", "method", "code"])
CALL_SECONDS = Histogram("hmi_request_seconds", "gRPC call latency (for streams: until the last message)",
                         ["service", "method"], buckets=LATENCY_BUCKETS)
IN_PROGRESS = Gauge("hmi_requests_in_progress", "gRPC calls being handled", ["service"])
OTHER_TENANTS = "_other"
log = logging.getLogger("hmi.calls")


def code_name(error: BaseException | None) -> str:
    """The status code a failure is answered with (OK for None)."""
    if error is None:
        return "OK"
    if isinstance(error, HMIError):
        return error.code_name
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return error.code().name
    return "UNKNOWN"


def split_method(full: str) -> tuple[str, str]:
    """`/hmi.v1.Gateway/Classify` -> (`hmi.v1.Gateway`, `Classify`)."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


class CallMetrics(grpc.ServerInterceptor):
    """Counts every call by its status code and times it (health checks and reflection are not counted)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or is_health_method(full) or full.startswith("/grpc.reflection."):
            return handler
        service, method = split_method(full)
        return run_inside(handler, lambda context: _observed(service, method, context))


@contextlib.contextmanager
def _observed(service: str, method: str, context) -> Iterator[None]:
    started = time.perf_counter()
    IN_PROGRESS.labels(service).inc()
    error = None
    try:
        yield
    except BaseException as raised:
        error = raised
        raise
    finally:
        _observe(service, method, context, error, started)


def _observe(service: str, method: str, context, error: BaseException | None, started: float) -> None:
    IN_PROGRESS.labels(service).dec()
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - contexts without code(): judge by the error alone
        code = None
    if isinstance(code, grpc.StatusCode):
        name = code.name
    elif isinstance(error, GeneratorExit):
        name = "CANCELLED"
    else:
        name = "OK" if error is None else code_name(error)
    seconds = time.perf_counter() - started
    CALLS.labels(service, method, name).inc()
    CALL_SECONDS.labels(service, method).observe(seconds)
    log.debug("%s/%s answered %s in %.1f ms", service, method, name, 1e3 * seconds)


class TopTenants:
    """Which tenants get a label value of their own: at most `slots` of the busiest at any time, the rest
    count as `_other`, so the number of series stays bounded with thousands of tenants.

    Counts are kept for `tracked` tenants (Space-Saving: a new tenant takes the place of the least counted one)
    and halved at every rebalance, so the set follows popularity as it shifts. A labelled tenant that falls
    far out of the top is dropped (`on_evict` removes its series) and its slot goes to a busier one."""

    def __init__(self, slots: int = 20, tracked: int = 0, rebalance_every: int = 512,
                 on_evict: Callable[[str], None] | None = None) -> None:
        self.slots = max(0, slots)
        self.tracked = tracked or max(64, 8 * self.slots)
        self.rebalance_every = rebalance_every
        self.on_evict = on_evict
        self.counts: dict[str, float] = {}
        self.labelled: set[str] = set()
        self._threshold = 0.0
        self._seen = 0
        self._lock = threading.Lock()

    def label(self, tenant: str) -> str:
        evicted: list[str] = []
        with self._lock:
            self._count(tenant)
            self._seen += 1
            if self._seen % self.rebalance_every == 0:
                evicted = self._rebalance()
            if tenant in self.labelled:
                result = tenant
            elif len(self.labelled) < self.slots and self.counts.get(tenant, 0) >= self._threshold:
                self.labelled.add(tenant)
                result = tenant
            else:
                result = OTHER_TENANTS
        for gone in evicted:
            if self.on_evict is not None:
                self.on_evict(gone)
        return result

    def _count(self, tenant: str) -> None:
        if tenant in self.counts:
            self.counts[tenant] += 1
            return
        if len(self.counts) >= self.tracked:
            least = min(self.counts, key=self.counts.__getitem__)
            floor = self.counts.pop(least)
            self.counts[tenant] = floor + 1
        else:
            self.counts[tenant] = 1

    def _rebalance(self) -> list[str]:
        ranked = sorted(self.counts, key=self.counts.__getitem__, reverse=True)
        top = set(ranked[:self.slots])
        near = set(ranked[:2 * self.slots])
        self._threshold = self.counts[ranked[self.slots - 1]] if self.slots and len(ranked) >= self.slots else 0.0
        evicted = [t for t in self.labelled if t not in near]
        self.labelled.difference_update(evicted)
        for tenant in list(self.counts):
            self.counts[tenant] /= 2
        self._threshold /= 2
        del top
        return evicted


class StateCollector(Collector):
    """Metrics read from a service's own objects when Prometheus scrapes (adapter pool, KV cache, queues,
    LMDB map), so serving code needs no instrumentation for them."""

    def __init__(self, collect: Callable[[], Iterable]) -> None:
        self._collect = collect

    def collect(self):
        try:
            yield from self._collect()
        except Exception:  # noqa: BLE001 - a scrape must never break; the metric is missing this time
            return


def register_state(collect: Callable[[], Iterable]) -> StateCollector:
    collector = StateCollector(collect)
    REGISTRY.register(collector)
    return collector


def serve_metrics(port: int, listen: str = "", host: str | None = None, tenant_labels: bool = False) -> None:
    """Prometheus text format at http://HOST:port/metrics, HOST being `host` or else that of the service's
    --listen address (all interfaces for 0.0.0.0 / [::]); refuses a port already in use, naming it.

    The port answers without a credential (Prometheus scrapes pods over the network), so it leaves out every
    series with a `tenant` label unless `tenant_labels`: tenant names are for the admin (the HTTP /metrics)."""
    if not port:
        return
    from prometheus_client import REGISTRY, start_http_server
    if not host:
        host = listen.rpartition(":")[0].strip("[]") if listen else ""
    host = host or "0.0.0.0"
    try:
        start_http_server(port, addr=host, registry=REGISTRY if tenant_labels else WithoutTenants(REGISTRY))
    except OSError as error:
        raise SystemExit(f"cannot serve metrics on {host}:{port} (--metrics-port): {error.strerror or error}; "
                         f"the port is in use or not allowed") from None


class WithoutTenants:
    """A registry view without the samples that name a tenant."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            kept = [sample for sample in family.samples if "tenant" not in sample.labels]
            if kept or not family.samples:
                family.samples = kept
                yield family
