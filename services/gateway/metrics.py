"""The gateway's own Prometheus metrics (beside services/common/metrics.py's calls by method and code):
requests per tenant for the busiest tenants, generation latency and tokens, and state read when scraped
(queue depth, batches in flight and replicas per model)."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from services.common.metrics import LATENCY_BUCKETS, TopTenants, code_name

TENANT_REQUESTS = Counter("hmi_gateway_tenant_requests_total", "requests per tenant (the busiest, others as "
                          "_other) by method and status code", ["tenant", "method", "code"])
REQUEST_SECONDS = Histogram("hmi_gateway_request_seconds", "request latency at the gateway (gRPC and HTTP)",
                            ["model", "method"], buckets=LATENCY_BUCKETS)
TOKENS = Counter("hmi_gateway_tokens_total", "tokens in (prompt and texts) and out (generated)",
                 ["model", "direction"])
TTFT_SECONDS = Histogram("hmi_gateway_time_to_first_token_seconds", "from a Generate request's arrival to its "
                         "first generated token", ["model"], buckets=LATENCY_BUCKETS)
INTER_TOKEN_SECONDS = Histogram("hmi_gateway_inter_token_seconds", "between consecutive generated tokens "
                                "of a stream", ["model"],
                                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))

_codes_seen: dict[str, set[tuple[str, str]]] = {}
_codes_lock = threading.Lock()


def _forget_tenant(tenant: str) -> None:
    with _codes_lock:
        pairs = _codes_seen.pop(tenant, set())
    for method, code in pairs:
        try:
            TENANT_REQUESTS.remove(tenant, method, code)
        except KeyError:
            pass


TOP_TENANTS = TopTenants(slots=20, on_evict=_forget_tenant)


def configure(top_tenants: int) -> None:
    TOP_TENANTS.slots = max(0, top_tenants)


@contextmanager
def observed(method: str, tenant: str, model_of) -> Iterator[dict]:
    """Counts one request by tenant and status code and times it; `model_of()` names its model at the end
    (unknown before the tenant is resolved). The block may put `model` in the yielded dict."""
    started = time.perf_counter()
    state: dict = {}
    error: BaseException | None = None
    try:
        yield state
    except BaseException as raised:
        error = raised
        raise
    finally:
        code = "CANCELLED" if isinstance(error, GeneratorExit) else code_name(error)
        label = TOP_TENANTS.label(tenant or "_none")
        if label == tenant:
            with _codes_lock:
                _codes_seen.setdefault(tenant, set()).add((method, code))
        TENANT_REQUESTS.labels(label, method, code).inc()
        REQUEST_SECONDS.labels(state.get("model") or model_of() or "", method).observe(time.perf_counter() - started)


def lane_state(lanes) -> Iterator:
    """Queue depth, in-flight batches and replicas per model, read when Prometheus scrapes."""
    queued = GaugeMetricFamily("hmi_gateway_queue_sequences", "sequences waiting to be batched", labels=["model"])
    queued_tokens = GaugeMetricFamily("hmi_gateway_queue_tokens", "tokens of the sequences waiting",
                                      labels=["model"])
    inflight = GaugeMetricFamily("hmi_gateway_inflight_batches", "batches sent and not answered, per compute "
                                 "replica", labels=["model", "replica"])
    replicas = GaugeMetricFamily("hmi_gateway_replicas", "compute replicas known by discovery, by state "
                                 "(ready, down, leaving)", labels=["model", "state"])
    sent = GaugeMetricFamily("hmi_gateway_replica_sent", "batches and streams sent to each replica since it "
                             "joined", labels=["model", "replica"])
    for name, lane in lanes.items():
        batcher = getattr(lane, "batcher", None)     # decoder lanes stream, they queue nothing here
        sequences, tokens = batcher.queued() if batcher is not None else (0, 0)
        queued.add_metric([name], sequences)
        queued_tokens.add_metric([name], tokens)
        counts = {"ready": 0, "down": 0, "leaving": 0}
        for address, state, in_flight, sent_count in lane.router.snapshot():
            counts[state] += 1
            inflight.add_metric([name, address], in_flight)
            sent.add_metric([name, address], sent_count)
        for state, count in counts.items():
            replicas.add_metric([name, state], count)
    yield from (queued, queued_tokens, inflight, replicas, sent)


HTTP_REQUESTS = Counter("hmi_http_requests_total", "HTTP front door requests by route and status",
                        ["route", "status"])
HTTP_SECONDS = Histogram("hmi_http_request_seconds", "HTTP front door latency until the response starts (streams: "
                         "their first bytes)", ["route"], buckets=LATENCY_BUCKETS)
