"""Compute follows the store's change log to forget the adapters of tenants that were replaced or deleted.

Correctness does not depend on it (versions are unique, so a cached old version is never served for a new
one); memory does: with tenant churn, the host cache would otherwise hold deleted tenants' adapters until LRU
pushed them out, so RSS kept growing towards `--host-cache-mib`. It polls without a follower id, so writes
never wait for compute.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc

from services.compute.adapter_pool import AdapterPool
from services.compute.bridge_cache import BridgeCache
from services.compute.plot_cache import PlotRowCache
from services.knowledge_store.client import StoreClient

log = logging.getLogger("hmi.compute.invalidation")


class AdapterInvalidation:
    def __init__(self, store: StoreClient, pool: AdapterPool, wait: float = 1.0,
                 bridges: BridgeCache | None = None, plot_cache: PlotRowCache | None = None) -> None:
        self.store = store
        self.pool = pool
        self.bridges = bridges      # rebuilt or deleted domains' bridges are dropped too
        self.plot_cache = plot_cache   # and every cached PLOT row: a rebuilt domain may be another's ancestor
        self.wait = wait
        self.revision: int | None = None
        self.store_id = ""
        self.forgotten = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="adapter-invalidation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def poll_once(self) -> int:
        """Applies the changes since the last poll; returns how many cache entries were dropped."""
        reply = self.store.changes(self.revision or 0, wait=self.wait if self.revision is not None else 0.0)
        if self.revision is None or reply.store_id != self.store_id or not reply.complete:
            self.store_id, self.revision = reply.store_id, reply.revision     # start from now
            return 0
        dropped = sum(self.pool.forget(change.name) for change in reply.changes if change.kind == "tenant")
        for change in reply.changes:
            if change.kind == "domain":
                if self.bridges is not None:
                    self.bridges.forget(change.name)
                if self.plot_cache is not None:
                    self.plot_cache.forget_all()
        self.revision = reply.changes[-1].revision if reply.changes else reply.revision
        self.forgotten += dropped
        return dropped

    def _follow(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                changed = self.poll_once()
            except grpc.RpcError:
                self._stop.wait(self.wait)    # the store is down or restarting: try again
                continue
            if not changed and time.monotonic() - started < self.wait / 4:
                self._stop.wait(self.wait)    # the store did not hold the poll (too many held): poll at intervals
