"""Domain bridges resident in compute (models/bridge.py), fetched once per (domain, revision) from the store.

A lookup answer names the bridge revision its rows need; a rebuilt domain gets a new revision, so a bridge
is never applied to rows of another build. Few domains, small modules (~1-2 MB each): a plain LRU of
`capacity` entries; concurrent batches needing the same missing bridge wait for one fetch.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from models.bridge import DomainBridge, parse_bridge
from services.knowledge_store.client import StoreClient

log = logging.getLogger("hmi.compute.bridges")
Key = tuple[str, int]   # (domain, bridge revision)


class BridgeCache:
    def __init__(self, store: StoreClient, hidden: int, device: torch.device, capacity: int = 64) -> None:
        self.store = store
        self.hidden = hidden
        self.device = device
        self.capacity = max(1, capacity)
        self._lock = threading.Lock()
        self._entries: OrderedDict[Key, DomainBridge] = OrderedDict()
        self._loading: dict[Key, threading.Lock] = {}
        self.fetches = 0

    def get(self, domain: str, revision: int, timeout: float) -> DomainBridge:
        """The bridge; NotFound / StaleVersion (from the store) when the domain no longer serves it."""
        key = (domain, revision)
        with self._lock:
            bridge = self._entries.get(key)
            if bridge is not None:
                self._entries.move_to_end(key)
                return bridge
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:   # one fetch per key; the others wait for it and then find it cached
            with self._lock:
                bridge = self._entries.get(key)
                if bridge is not None:
                    return bridge
            try:
                bridge = parse_bridge(self.store.get_bridge(domain, revision, timeout=timeout), self.hidden,
                                      self.device)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self.fetches += 1
                self._entries[key] = bridge
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            log.info("loaded bridge of domain %s (revision %d, %.1f MiB)", domain, revision,
                     bridge.parameter_bytes() / 2**20)
            return bridge

    def forget(self, domain: str) -> None:
        """Drops every revision of a domain's bridge (it was rebuilt or deleted)."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == domain]:
                del self._entries[key]
