"""Picks a compute replica for a batch: tenant affinity first (each tenant has a home replica by
rendezvous hashing, so its adapter stays hot there), load second (a bound on batches in flight per
replica; a full or failing home spills to the replica with the most room), round robin among equals."""
from __future__ import annotations

import hashlib
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Collection

from hmi_proto.v1 import compute_pb2_grpc as pb_grpc
from services.common.auth.peers import PeerSecurity
from services.common.rpc import channel


@dataclass
class Replica:
    address: str
    stub: pb_grpc.ComputeStub
    capacity: int                       # batches in flight at most
    inflight: int = 0
    down_until: float = 0.0


HOMES_CACHED = 100_000


class Router:
    def __init__(self, addresses: list[str], *, inflight_per_replica: int = 2, down_seconds: float = 1.0,
                 security: PeerSecurity | None = None) -> None:
        if not addresses:
            raise ValueError("at least one compute address is needed (HMI_COMPUTE_ADDRS)")
        self.replicas = [Replica(a, pb_grpc.ComputeStub(channel(a, security=security)), inflight_per_replica)
                         for a in addresses]
        self.down_seconds = down_seconds
        self._cycle = itertools.cycle(range(len(self.replicas)))
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._homes: dict[str, int] = {}   # the replica list is fixed: a tenant's home is hashed once

    def home(self, tenant_id: str) -> int:
        """The tenant's home replica: the highest hash of (tenant, replica); stable when replicas come and go."""
        home = self._homes.get(tenant_id)
        if home is None:
            if len(self._homes) >= HOMES_CACHED:
                self._homes.clear()
            home = self._homes[tenant_id] = max(range(len(self.replicas)),
                                                key=lambda i: _score(tenant_id, self.replicas[i].address))
        return home

    def home_replica(self, tenant_id: str) -> Replica:
        """For a generation stream (no batch slot): the tenant's home, or the next healthy replica."""
        now = time.monotonic()
        ranked = sorted(range(len(self.replicas)), key=lambda i: -_score(tenant_id, self.replicas[i].address))
        healthy = [i for i in ranked if self.replicas[i].down_until <= now] or ranked
        return self.replicas[healthy[0]]

    def acquire(self, tenant_ids: Collection[str] = ()) -> Replica:
        """Blocks until some replica has room for one more batch (see try_acquire for the choice)."""
        with self._room:
            while (replica := self._pick(tenant_ids)) is None:
                self._room.wait(0.1)   # woken by release; the timeout re-checks replicas marked down
            return replica

    def try_acquire(self, tenant_ids: Collection[str] = ()) -> Replica | None:
        """A replica with room, or None when all are full: prefers replicas not marked down, then the home
        of most of the batch's tenants, then the one with the fewest batches in flight."""
        with self._lock:
            return self._pick(tenant_ids)

    def _pick(self, tenant_ids) -> Replica | None:
        votes = [0] * len(self.replicas)
        if len(self.replicas) > 1:
            for tenant_id in set(tenant_ids):
                votes[self.home(tenant_id)] += 1
        order = [next(self._cycle) for _ in self.replicas]
        now = time.monotonic()
        healthy = [i for i in order if self.replicas[i].down_until <= now] or order
        for index in sorted(healthy, key=lambda i: (-votes[i], self.replicas[i].inflight)):
            replica = self.replicas[index]
            if replica.inflight < replica.capacity:
                replica.inflight += 1
                return replica
        return None

    def release(self, replica: Replica, failed: bool = False) -> None:
        with self._lock:
            if failed:
                replica.down_until = time.monotonic() + self.down_seconds
            replica.inflight -= 1
            self._room.notify()


def _score(tenant_id: str, address: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{tenant_id}@{address}".encode(), digest_size=8).digest(), "big")
