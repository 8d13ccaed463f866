"""Health that load cannot starve, readiness per service name, and probes of peers.

A busy server must still answer its probes, or an orchestrator restarts it exactly when it is busiest. gRPC
Python runs every handler, health checks included, on one thread pool and refuses calls past
`maximum_concurrent_rpcs`; here health checks run on a small pool of their own (`HealthFirstExecutor`) and
the limit on calls in progress (`ConcurrencyLimit`) leaves them out.

Names reported on the standard health service (grpc.health.v1):

- `liveness`: SERVING while the process runs and is not stopping (what a liveness probe asks);
- each service's full name (`hmi.v1.Gateway`, `hmi.v1.Admin`, `hmi.v1.Compute`, `hmi.v1.KnowledgeStore`):
  whether that service can serve now (the gateway's needs a reachable store and compute for every model);
- `""` (the whole server): SERVING when every one of its services is (what a readiness probe asks).
"""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.fair_pool import FairThreadPool
from services.common.interception import replace_behavior, run_inside

log = logging.getLogger("hmi.health")
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def is_health_method(method: str | bytes | None) -> bool:
    if isinstance(method, bytes):
        method = method.decode("ascii", "replace")
    return bool(method) and method.startswith(HEALTH_METHOD_PREFIX)


def fast_path(behavior):
    """Marks a handler that answers at once (a refusal): it runs on the health threads, never queued behind
    busy request threads."""
    behavior.fast_path = True
    return behavior


class HealthFirstExecutor(FairThreadPool):
    """The server's thread pool, with health checks (and refusals) sent to threads of their own, and other
    calls taken in turn across callers (services/common/fair_pool.py).

    gRPC hands the pool each call's handler among the arguments; `ConcurrencyLimit` marks the handlers of health
    checks and refusals (`fast_path`), and for methods gRPC looks up by name the call's event names the method
    (tests/test_health.py checks that this holds for the gRPC version installed)."""

    def __init__(self, max_workers: int, health_workers: int = 4, thread_name_prefix: str = "rpc") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._health = futures.ThreadPoolExecutor(max_workers=health_workers, thread_name_prefix="health")

    def submit(self, fn, /, *args, **kwargs):
        if _names_health_call(args):
            return self._health.submit(fn, *args, **kwargs)
        return super().submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._health.shutdown(wait=wait, cancel_futures=cancel_futures)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


def _names_health_call(args: tuple) -> bool:
    for arg in args[:6]:
        if getattr(arg, "fast_path", False):
            return True
        details = getattr(arg, "call_details", None)
        if details is not None and is_health_method(getattr(details, "method", None)):
            return True
    return False


class _Slot:
    """One call's place under the limit, given back once whatever happens (the handler may never run when
    the caller leaves first: then the handler is dropped, and with it the slot)."""

    __slots__ = ("_limit", "_held")

    def __init__(self, limit: "ConcurrencyLimit") -> None:
        self._limit = limit
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limit._release()

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "_Slot":
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


class ConcurrencyLimit(grpc.ServerInterceptor):
    """Refuses calls beyond `limit` in progress with RESOURCE_EXHAUSTED, as gRPC's `maximum_concurrent_rpcs`
    would, but never a health check."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        if is_health_method(handler_call_details.method):
            if handler.unary_unary is not None:      # Check (Watch streams stay on the request threads)
                return handler._replace(unary_unary=fast_path(_delegate(handler.unary_unary)))
            return handler
        with self._lock:
            if self._active >= self.limit:
                return _refusal(handler, f"the server has {self._active} calls in progress, its limit: back off "
                                         f"and retry")
            self._active += 1
        return _holding(handler, _Slot(self))


def _delegate(behavior):
    def run(request, context):
        return behavior(request, context)
    return run


def _holding(handler, slot: _Slot):
    return run_inside(handler, lambda _context: slot)


def _refusal(handler, message: str):
    @fast_path
    def refuse(_request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    @fast_path
    def refuse_stream(_request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        yield  # pragma: no cover - abort raises

    return replace_behavior(handler, lambda _behavior: refuse, lambda _behavior: refuse_stream)


class HealthReport:
    """What one process reports: `liveness`, each of its services' readiness, and `""` = all of them."""

    def __init__(self, servicer: health.HealthServicer, services: Iterable[str]) -> None:
        self.servicer = servicer
        self.services = list(services)
        self._ready = dict.fromkeys(self.services, False)
        self._lock = threading.Lock()
        self._stopping = False
        self.servicer.set(LIVENESS, SERVING)
        self._publish()

    def set(self, service: str, ready: bool) -> None:
        with self._lock:
            self._ready[service] = ready
            self._publish()

    def set_all(self, ready: bool) -> None:
        with self._lock:
            self._ready = dict.fromkeys(self._ready, ready)
            self._publish()

    def stopping(self) -> None:
        """Draining: nothing is ready any more and liveness ends too."""
        with self._lock:
            self._stopping = True
            self._ready = dict.fromkeys(self._ready, False)
            self._publish()
            self.servicer.set(LIVENESS, NOT_SERVING)

    def ready(self, service: str = "") -> bool:
        with self._lock:
            if service:
                return self._ready.get(service, False)
            return not self._stopping and all(self._ready.values())

    def _publish(self) -> None:
        for name, ready in self._ready.items():
            self.servicer.set(name, SERVING if ready and not self._stopping else NOT_SERVING)
        overall = not self._stopping and all(self._ready.values())
        self.servicer.set("", SERVING if overall else NOT_SERVING)


def add_health(server: grpc.Server, services: Iterable[str]) -> HealthReport:
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return HealthReport(servicer, services)


def probe(channel: grpc.Channel, service: str = "", timeout: float = 1.0) -> bool:
    """True when the server behind `channel` reports `service` SERVING within `timeout`."""
    return probe_answer(channel, service, timeout) is True


def probe_answer(channel: grpc.Channel, service: str = "", timeout: float = 1.0) -> bool | None:
    """SERVING (True), a definite no (False: NOT_SERVING, refused, unknown service), or no answer in time (None).

    A slow answer is told apart from a no because a busy server misses a short probe deadline now and then;
    a watcher that moves work on the first miss sends a tenant away from its warm replica for nothing.
    """
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                           timeout=timeout)
    except grpc.RpcError as error:
        return None if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
    return reply.status == SERVING
