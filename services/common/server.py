"""Process bootstrap shared by every service: gRPC server, health, reflection, metrics, signals."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from services.common.auth.peers import PeerSecurity, RequireServiceSecret
from services.common.decoding import DecodeRequests
from services.common.health import ConcurrencyLimit, HealthFirstExecutor, HealthReport, add_health
from services.common.memory import limit_arenas, start_trimming
from services.common.metrics import CallMetrics, serve_metrics
from services.common.rpc import CHANNEL_OPTIONS
from services.common.tracing import CallContext, shutdown_tracing

log = logging.getLogger("hmi.server")
SUPERVISOR_PID = "HMI_SUPERVISOR_PID"     # set by `hmi up`: a service whose supervisor is gone stops


@dataclass
class RunningServer:
    server: grpc.Server
    health: HealthReport
    address: str
    limit: ConcurrencyLimit | None = None

    def set_serving(self, serving: bool = True, service: str | None = None) -> None:
        """Readiness of one of this server's services, or of all of them."""
        if service is None:
            self.health.set_all(serving)
        else:
            self.health.set(service, serving)


def start_server(address: str, register: Callable[[grpc.Server], None], service_names: Sequence[str],
                 *, workers: int = 32, metrics_port: int = 0, security: PeerSecurity | None = None,
                 internal: bool = False, reflection_on: bool = False,
                 metrics_host: str | None = None, metrics_tenant_labels: bool = False) -> RunningServer:
    """Binds (refusing a port another process listens on), registers health (every service NOT_SERVING until
    the caller says otherwise; health checks answered on threads of their own) and, when asked, reflection,
    starts; serves Prometheus metrics on `metrics_port`; memory freed after a burst goes back to the system
    (services/common/memory.py).

    An `internal` service (store, compute) refuses calls without the service secret when `security` has one,
    and with TLS and a CA it requires client certificates (mutual TLS). Metrics bind to the interface the
    gRPC port listens on unless `metrics_host` says otherwise."""
    limit_arenas()
    start_trimming()
    watch_supervisor()
    limit = ConcurrencyLimit(workers * 8)
    interceptors: list[grpc.ServerInterceptor] = [CallContext(), CallMetrics(), limit, DecodeRequests()]
    if internal and security is not None and security.auth and security.service_secret:
        # refused before taking a place under the limit or decoding anything; still counted in the metrics
        interceptors.insert(2, RequireServiceSecret(security.service_secret))
    server = grpc.server(HealthFirstExecutor(workers), options=CHANNEL_OPTIONS, interceptors=interceptors)
    register(server)
    report = add_health(server, service_names)
    if reflection_on:
        reflection.enable_server_reflection(
            list(service_names) + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    credentials = (security.server_credentials(require_client_certificate=internal)
                   if security is not None else None)
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on {address}: the port is already in use (another HMI deployment or "
                         f"another program listens there) or the address is invalid; choose a free port")
    server.start()
    serve_metrics(metrics_port, address, host=metrics_host, tenant_labels=metrics_tenant_labels)
    return RunningServer(server, report, address, limit)


def die_with_supervisor() -> None:
    """Under `hmi up` (HMI_SUPERVISOR_PID set), first thing in the service's process: on Linux the kernel is
    asked for SIGTERM when the thread that started it exits (PR_SET_PDEATHSIG), and a supervisor already gone
    ends the process at once. Asked here rather than between fork and exec in the supervisor, where Python code
    in the child of a threaded process can deadlock or crash (at-fork handlers of libraries run there)."""
    expected = os.environ.get(SUPERVISOR_PID)
    if not expected or not expected.isdigit():
        return
    if sys.platform == "linux":
        try:
            import ctypes
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != int(expected):     # gone before the kernel was asked: nobody would send the signal
        os._exit(1)


def watch_supervisor() -> None:
    """Under `hmi up` (HMI_SUPERVISOR_PID set): stop as if by SIGTERM once the supervisor is gone. On Linux the
    kernel signals the child already (die_with_supervisor); this covers other systems and a supervisor that
    handed the child over."""
    expected = os.environ.get(SUPERVISOR_PID)
    if not expected or not expected.isdigit():
        return

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != int(expected):
                log.warning("the supervisor (pid %s) is gone: stopping", expected)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


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
    running.health.stopping()
    running.server.stop(grace).wait()
    if on_stop is not None:
        on_stop()
    shutdown_tracing()
    watchdog.cancel()
    log.info("stopped")
    # Exit now: worker pools' threads (which the interpreter would join at exit) and the metrics and HTTP
    # threads would keep the process, and its ports, for seconds after it stopped serving. Everything written
    # is committed (LMDB transactions), so nothing is lost.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _give_up(log: logging.Logger, limit: float) -> None:
    log.error("still draining %.0fs after the signal: exiting without finishing", limit)
    logging.shutdown()
    os._exit(1)
