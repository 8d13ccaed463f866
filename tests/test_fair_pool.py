"""The server's thread pool takes waiting calls in turn across callers; gRPC hands it what names the caller."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from services.common.fair_pool import FairThreadPool, call_flow


def by_first_arg(args: tuple):
    return args[0]


def test_a_caller_with_one_call_waits_for_one_call_of_the_flooding_caller_not_its_backlog():
    pool = FairThreadPool(1, flow_of=by_first_arg)
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def blocker(flow):
        started.set()
        release.wait(5)

    def record(flow, name):
        order.append(name)

    pool.submit(blocker, "flood")
    assert started.wait(5)
    for i in range(20):
        pool.submit(record, "flood", f"flood-{i}")
    last = pool.submit(record, "light", "light")
    assert pool.pending == 21 and pool.flows == 2
    release.set()
    last.result(5)
    pool.shutdown(wait=True)
    assert order.index("light") == 1, order[:5]
    assert [name for name in order if name != "light"] == [f"flood-{i}" for i in range(20)], "FIFO within a flow"


def test_results_exceptions_and_shutdown_behave_as_an_executor():
    pool = FairThreadPool(3, flow_of=by_first_arg)
    assert [f.result(5) for f in [pool.submit(lambda flow, x: x * x, i % 2, i) for i in range(10)]] == [
        i * i for i in range(10)]
    failing = pool.submit(lambda flow: 1 / 0, "a")
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    gate, started = threading.Event(), threading.Semaphore(0)

    def hold(flow):
        started.release()
        return gate.wait(5)

    running = [pool.submit(hold, "b") for _ in range(3)]      # every thread busy
    for _ in range(3):
        assert started.acquire(timeout=5)
    queued = [pool.submit(lambda flow: None, "c") for _ in range(5)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    gate.set()
    assert all(f.result(5) for f in running), "calls already running finish"
    with pytest.raises(RuntimeError):
        pool.submit(lambda flow: None, "a")


def test_grpc_hands_the_pool_each_callers_credential_and_connection():
    """The flow comes from what gRPC passes to `submit` (its call event), which this checks for the installed
    gRPC: two credentials are two flows, and without one each connection is its own."""
    seen: list = []
    lock = threading.Lock()

    def flow_of(args):
        flow = call_flow(args)
        with lock:
            seen.append(flow)
        return flow

    pool = FairThreadPool(4, flow_of=flow_of)
    server = grpc.server(pool)
    handler = grpc.method_handlers_generic_handler(
        "t.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        own_connection = [("grpc.use_local_subchannel_pool", 1)]    # else both channels share one connection
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=own_connection) for _ in range(2)]
        echo = [channel.unary_unary("/t.Echo/Echo") for channel in channels]
        assert echo[0](b"x", metadata=(("authorization", "Bearer key-a"),), timeout=5) == b"x"
        echo[0](b"x", metadata=(("authorization", "Bearer key-a"),), timeout=5)
        echo[1](b"x", metadata=(("authorization", "Bearer key-b"),), timeout=5)
        echo[0](b"x", timeout=5)
        echo[1](b"x", timeout=5)
        for channel in channels:
            channel.close()
    finally:
        server.stop(None)
        pool.shutdown(wait=False)
    key_a, key_a_again, key_b, peer_0, peer_1 = seen
    assert key_a == key_a_again != key_b
    assert isinstance(peer_0, bytes | str) and peer_0 != peer_1, "each connection is its own flow"
    assert len({key_a, key_b, peer_0, peer_1}) == 4


def test_the_flow_of_an_unknown_shape_is_shared():
    assert call_flow(()) == call_flow((object(), 1)) == "anonymous"
    assert futures.Executor in FairThreadPool.__mro__
