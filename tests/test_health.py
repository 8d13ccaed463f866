"""Health that load cannot starve: a server whose request threads are all busy, and which refuses calls past
its limit, still answers health checks at once; readiness per service name; liveness; a taken port is refused.
(A real gRPC server in this process with a slow handler; no models.)"""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hmi.launcher import free_port
from services.common.health import LIVENESS
from services.common.server import start_server

SLOW = "/test.Slow/Wait"


def slow_service(release: threading.Event):
    def wait(request: bytes, context) -> bytes:
        release.wait(10)
        return b"done"

    return grpc.method_handlers_generic_handler("test.Slow", {
        "Wait": grpc.unary_unary_rpc_method_handler(wait)})


@pytest.fixture
def busy_server():
    release = threading.Event()
    address = f"127.0.0.1:{free_port()}"
    running = start_server(address, lambda server: server.add_generic_rpc_handlers((slow_service(release),)),
                           ["test.Slow", "test.Other"], workers=2)
    yield running, release
    release.set()
    running.server.stop(0)


def check(stub, service: str = "") -> tuple[int, float]:
    started = time.perf_counter()
    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    return status, time.perf_counter() - started


def test_health_answers_at_once_while_every_request_thread_is_busy_and_calls_are_refused(busy_server):
    running, release = busy_server
    running.set_serving(True)
    channel = grpc.insecure_channel(running.address)
    stub = health_pb2_grpc.HealthStub(channel)
    slow = channel.unary_unary(SLOW)
    calls = [slow.future(b"", timeout=15) for _ in range(24)]   # 2 threads busy, the rest queued, 16 in progress max
    time.sleep(0.5)
    refused = [c for c in calls if c.done() and c.exception() is not None
               and c.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused, "past 8 x workers calls in progress the server must shed load"
    latencies = []
    for _ in range(20):
        status, seconds = check(stub)
        assert status == health_pb2.HealthCheckResponse.SERVING
        latencies.append(seconds)
    assert max(latencies) < 0.1, f"health checks took up to {max(latencies) * 1e3:.0f} ms while the pool was busy"
    release.set()
    answered = [c.result() for c in calls if c not in refused]
    assert answered and all(r == b"done" for r in answered)
    assert running.limit.active == 0, "every call gave its place back"


def test_readiness_per_service_name_and_liveness(busy_server):
    running, _ = busy_server
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(running.address))
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert check(stub, "")[0] == not_serving and check(stub, LIVENESS)[0] == serving
    running.set_serving(True, "test.Slow")
    assert check(stub, "test.Slow")[0] == serving
    assert check(stub, "test.Other")[0] == not_serving
    assert check(stub, "")[0] == not_serving, "the server is ready only when all its services are"
    running.set_serving(True, "test.Other")
    assert check(stub, "")[0] == serving
    running.health.stopping()
    assert [check(stub, name)[0] for name in ("", "test.Slow", LIVENESS)] == [not_serving] * 3


def test_a_second_server_on_a_taken_port_is_refused_naming_it(busy_server):
    running, _ = busy_server
    with pytest.raises(SystemExit, match=running.address.replace(".", r"\.") + ".*already in use"):
        start_server(running.address, lambda server: None, ["test.Slow"], workers=1)
