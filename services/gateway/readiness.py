"""The gateway's readiness: what its health service reports, from probes of its peers.

- `hmi.v1.Admin` and `hmi.v1.FineTuning` are SERVING while the knowledge store answers its health check;
- `hmi.v1.Gateway` (and `""`, the whole server) once the store has answered since the gateway started, while
  every required model has at least one compute replica that answered SERVING (services/gateway/router.py
  probes each replica). A store that stops answering later does not take inference down: the gateway keeps
  serving the tenants whose records it holds, and compute those whose adapters and PLOT rows it holds; the
  others fail with UNAVAILABLE until the store is back. It is logged, and `hmi.v1.Admin` reports it.

A readiness probe (Kubernetes, compose, `hmi up`) so sends no traffic to a gateway that could only fail, and
the gateway comes back by itself once its peers do. Liveness (`liveness`) stays SERVING meanwhile: restarting
the gateway would not bring compute back.
"""
from __future__ import annotations

import logging
import threading

import grpc

from services.common.health import HealthReport, probe
from services.gateway.router import Router

log = logging.getLogger("hmi.gateway.readiness")
STORE_SERVICE = "hmi.v1.KnowledgeStore"


class Readiness:
    def __init__(self, report: HealthReport, store: grpc.Channel, routers: dict[str, Router],
                 required: list[str], interval: float = 1.0) -> None:
        self.report = report
        self.store = store
        self.routers = routers
        self.required = required
        self.interval = interval
        self.problems: list[str] = ["not checked yet"]
        self.store_seen = False          # the store answered once since start: records can be cached
        self.store_down = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> list[str]:
        """Probes once and publishes; returns what keeps the gateway from serving (empty: ready)."""
        problems = []
        store_ok = probe(self.store, STORE_SERVICE, timeout=max(0.2, min(1.0, self.interval)))
        self.store_seen = self.store_seen or store_ok
        if not self.store_seen:
            problems.append("the knowledge store does not answer")
        if self.store_seen and store_ok == self.store_down:
            self.store_down = not store_ok
            if self.store_down:
                log.warning("the knowledge store does not answer: serving the tenants whose records, adapters and "
                            "PLOT rows are cached; the others fail with UNAVAILABLE until it is back")
            else:
                log.info("the knowledge store answers again")
        for model in self.required:
            router = self.routers[model]
            if not router.usable_count():
                problems.append(f"no compute replica of model {model!r} answers ({router.describe()})")
        if problems != self.problems:
            if problems:
                log.warning("not ready: %s", "; ".join(problems))
            else:
                log.info("ready: the store and compute for %s answer", ", ".join(self.required))
        self.problems = problems
        self.report.set("hmi.v1.Admin", store_ok)
        self.report.set("hmi.v1.FineTuning", store_ok)      # jobs live in the store; computes take them when up
        self.report.set("hmi.v1.Gateway", not problems)
        return problems

    def ready(self) -> bool:
        return self.report.ready()

    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._loop, name="readiness", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - readiness must keep being reported
                log.exception("readiness check")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
