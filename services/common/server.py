"""Process bootstrap shared by every service: gRPC server, health, reflection, metrics, signals."""
from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth.peers import PeerSecurity, RequireServiceSecret
from services.common.decoding import DecodeRequests
from services.common.memory import limit_arenas, start_trimming
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


def listen_host(address: str) -> str:
    """The interface part of HOST:PORT ('[::]:50051' -> '::')."""
    return address.rpartition(":")[0].strip("[]") or "0.0.0.0"


def start_server(address: str, register: Callable[[grpc.Server], None], service_names: Sequence[str],
                 *, workers: int = 32, metrics_port: int = 0, security: PeerSecurity | None = None,
                 internal: bool = False, reflection_on: bool = False,
                 metrics_host: str | None = None) -> RunningServer:
    """Binds, registers health (NOT_SERVING until the caller says otherwise) and, when asked, reflection,
    starts; memory freed after a burst goes back to the system (services/common/memory.py).

    An `internal` service (store, compute) refuses calls without the service secret when `security` has one,
    and with TLS and a CA it requires client certificates (mutual TLS). Metrics bind to the interface the
    gRPC port listens on unless `metrics_host` says otherwise."""
    limit_arenas()
    start_trimming()
    interceptors: list[grpc.ServerInterceptor] = [DecodeRequests()]
    if internal and security is not None and security.auth and security.service_secret:
        interceptors.insert(0, RequireServiceSecret(security.service_secret))   # before any parsing
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         options=CHANNEL_OPTIONS, maximum_concurrent_rpcs=workers * 8,
                         interceptors=interceptors)
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_on:
        reflection.enable_server_reflection(
            list(service_names) + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    credentials = (security.server_credentials(require_client_certificate=internal)
                   if security is not None else None)
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}: address in use or invalid")
    server.start()
    if metrics_port:
        from prometheus_client import start_http_server
        start_http_server(metrics_port, addr=metrics_host or listen_host(address))
    running = RunningServer(server, health_servicer, address)
    running.set_serving(False)
    return running


def wait_for_termination(running: RunningServer, log: logging.Logger,
                         on_stop: Callable[[], None] | None = None, grace: float = 5.0,
                         on_signal: Callable[[], None] | None = None, hard_limit: float = 15.0) -> None:
    """Blocks until SIGINT/SIGTERM, then drains: `on_signal` first (cancel long jobs), in-flight calls for `grace`
    seconds, then `on_stop`. A drain that takes longer than `hard_limit` seconds, or a second signal, ends the
    process at once (every write is an LMDB transaction, so that loses nothing committed)."""
    stop = threading.Event()

    def handle(signum, _frame):
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("received %s, shutting down (at most %.0fs)", signal.Signals(signum).name, hard_limit)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    stop.wait()
    watchdog = threading.Timer(hard_limit, _give_up, args=(log, hard_limit))
    watchdog.daemon = True
    watchdog.start()
    if on_signal is not None:
        on_signal()
    running.set_serving(False)
    running.server.stop(grace).wait()
    if on_stop is not None:
        on_stop()
    watchdog.cancel()
    log.info("stopped")


def _give_up(log: logging.Logger, limit: float) -> None:
    log.error("still draining %.0fs after the signal: exiting without finishing", limit)
    logging.shutdown()
    os._exit(1)
