"""Process bootstrap shared by every service: gRPC server, health, reflection, metrics, signals."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.rpc import CHANNEL_OPTIONS


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    address: str

    def set_serving(self, serving: bool = True) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set("", status)


def start_server(address: str, register: Callable[[grpc.Server], None], service_names: Sequence[str],
                 *, workers: int = 32, metrics_port: int = 0) -> RunningServer:
    """Binds, registers health (NOT_SERVING until the caller says otherwise) and reflection, starts."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         options=CHANNEL_OPTIONS, maximum_concurrent_rpcs=workers * 8)
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        list(service_names) + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}: address in use or invalid")
    server.start()
    if metrics_port:
        from prometheus_client import start_http_server
        start_http_server(metrics_port)
    running = RunningServer(server, health_servicer, address)
    running.set_serving(False)
    return running


def wait_for_termination(running: RunningServer, log: logging.Logger,
                         on_stop: Callable[[], None] | None = None, grace: float = 5.0) -> None:
    """Blocks until SIGINT/SIGTERM, then drains in-flight calls for `grace` seconds."""
    stop = threading.Event()

    def handle(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    stop.wait()
    running.set_serving(False)
    running.server.stop(grace).wait()
    if on_stop is not None:
        on_stop()
    log.info("stopped")
