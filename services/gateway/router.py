"""Picks a compute replica for a batch: tenant affinity first (each tenant has a home replica by
rendezvous hashing, so its adapter stays hot there), load second (a bound on batches in flight per
replica; a full or failing home spills to the replica with the most room), round robin among equals.

Replicas come from discovery (services/common/discovery.py): every address behind the `--compute` targets is
one replica, with its own channel, in-flight limit and health. `start()` runs a watcher thread that resolves
the targets again (periodically, and soon after a replica failed) and probes each replica's health service:
only replicas that answered SERVING get work. A replica that leaves discovery takes no new batch and is
dropped once its batches in flight have answered; a tenant's home moves only when its home leaves or joins.
Without `start()` (unit tests) every listed address counts as healthy until a call fails on it.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Collection

import grpc

from services.common.auth.peers import PeerSecurity
from services.common.discovery import Discovery, Resolver
from services.common.health import probe_answer
from services.common.rpc import channel
from services.compute.client import ComputeStub, compute_stub

log = logging.getLogger("hmi.gateway.router")
COMPUTE_SERVICE = "hmi.v1.Compute"


@dataclass(eq=False)
class Replica:
    address: str
    stub: ComputeStub
    capacity: int                       # batches in flight at most
    channel: grpc.Channel | None = None
    inflight: int = 0
    down_until: float = 0.0             # a call failed on it: avoided until then (or until a probe says SERVING)
    healthy: bool = True                # the last probe's answer (True until probed when nothing probes)
    leaving: bool = False               # gone from discovery: finishes its batches, takes no new one
    sent: int = 0                       # batches and streams sent to it
    failures: int = 0
    missed_probes: int = 0              # probes in a row that got no answer in time

    def usable(self, now: float) -> bool:
        return self.healthy and not self.leaving and self.down_until <= now


HOMES_CACHED = 100_000
MISSED_PROBES_DOWN = 3      # as Kubernetes' failureThreshold: one slow answer under load is not an outage


class Router:
    def __init__(self, targets: list[str], *, inflight_per_replica: int = 2, down_seconds: float = 1.0,
                 model: str = "", resolver: Resolver | None = None, discovery_interval: float = 5.0,
                 probe_interval: float = 1.0, security: PeerSecurity | None = None) -> None:
        self.model = model
        self.security = security        # TLS and the service secret on calls and probes alike
        self.discovery = Discovery(targets, resolver, interval=discovery_interval,
                                   min_interval=min(0.5, discovery_interval))
        self.inflight_per_replica = inflight_per_replica
        self.down_seconds = down_seconds
        self.probe_interval = probe_interval
        self._members: dict[str, Replica] = {}
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._homes: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probes: ThreadPoolExecutor | None = None
        self._apply(self.discovery.resolve(), probed=False)

    # ---- membership ------------------------------------------------------------------------

    @property
    def replicas(self) -> list[Replica]:
        """The current members (leaving ones excluded), in the order they joined."""
        with self._lock:
            return [r for r in self._members.values() if not r.leaving]

    def _apply(self, addresses: list[str], probed: bool = True) -> None:
        """Adds new addresses (unhealthy until probed when a watcher probes), marks missing ones leaving."""
        with self._lock:
            current = set(addresses)
            for address in addresses:
                replica = self._members.get(address)
                if replica is None:
                    connection = channel(address, authority=self.discovery.authority(address),
                                         security=self.security)
                    self._members[address] = Replica(address, compute_stub(connection),
                                                     self.inflight_per_replica, channel=connection,
                                                     healthy=not probed)
                    self._homes.clear()
                    if probed:
                        log.info("compute replica %s%s joined", address, f" ({self.model})" if self.model else "")
                elif replica.leaving:
                    replica.leaving = False
                    self._homes.clear()
            for address, replica in list(self._members.items()):
                if address not in current and not replica.leaving:
                    replica.leaving = True
                    self._homes.clear()
                    log.info("compute replica %s%s left discovery: no new work for it", address,
                             f" ({self.model})" if self.model else "")
                    self._drop_if_idle(replica)
            self._room.notify_all()

    def _drop_if_idle(self, replica: Replica) -> None:
        if replica.leaving and replica.inflight == 0 and self._members.get(replica.address) is replica:
            del self._members[replica.address]
            if replica.channel is not None:
                replica.channel.close()

    def start(self) -> None:
        """Probes every replica now, then keeps discovery and health current in a thread of its own."""
        self._probes = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self._probe_all()
        self._thread = threading.Thread(target=self._watch, name="router-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._probes is not None:
            self._probes.shutdown(wait=False, cancel_futures=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.probe_interval):
            try:
                if self.discovery.due(soon=not self.usable_count()):   # none usable: look again sooner
                    self._apply(self.discovery.resolve())
                self._probe_all()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("replica watcher")

    def _probe_all(self) -> None:
        with self._lock:
            members = [r for r in self._members.values() if not r.leaving]
        timeout = max(0.2, min(1.0, self.probe_interval))
        answers = list(self._probes.map(lambda r: probe_answer(r.channel, COMPUTE_SERVICE, timeout), members))
        with self._lock:
            for replica, answer in zip(members, answers):
                replica.missed_probes = replica.missed_probes + 1 if answer is None else 0
                # a definite no counts at once; silence only after MISSED_PROBES_DOWN probes in a row
                healthy = answer if answer is not None else (
                    replica.healthy and replica.missed_probes < MISSED_PROBES_DOWN)
                if healthy != replica.healthy:
                    log.info("compute replica %s is %s", replica.address, "SERVING" if healthy else "not serving")
                    if not healthy:
                        self.discovery.request()
                replica.healthy = healthy
                if answer:
                    replica.down_until = 0.0
            self._room.notify_all()

    # ---- state -----------------------------------------------------------------------------

    def usable_count(self) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(r.usable(now) for r in self._members.values())

    def describe(self) -> str:
        now = time.monotonic()
        with self._lock:
            states = [f"{r.address} {'ready' if r.usable(now) else 'leaving' if r.leaving else 'down'}"
                      for r in self._members.values()]
        return f"{self.discovery.describe()} -> {', '.join(states) or 'no address'}"

    def snapshot(self) -> list[tuple[str, str, int, int]]:
        """(address, state, batches in flight, sent) per member, for metrics."""
        now = time.monotonic()
        with self._lock:
            return [(r.address, "ready" if r.usable(now) else "leaving" if r.leaving else "down", r.inflight, r.sent)
                    for r in self._members.values()]

    # ---- choosing --------------------------------------------------------------------------

    def home(self, tenant_id: str) -> int:
        """Index in `replicas` of the tenant's home: the highest hash of (tenant, replica address)."""
        replicas = self.replicas
        address = self.home_address(tenant_id)
        return next(i for i, r in enumerate(replicas) if r.address == address)

    def home_address(self, tenant_id: str) -> str:
        with self._lock:
            return self._home(tenant_id)

    def _home(self, tenant_id: str) -> str:
        home = self._homes.get(tenant_id)
        if home is None:
            candidates = [a for a, r in self._members.items() if not r.leaving]
            if not candidates:
                return ""
            if len(self._homes) >= HOMES_CACHED:
                self._homes.clear()
            home = self._homes[tenant_id] = max(candidates, key=lambda a: _score(tenant_id, a))
        return home

    def ranked(self, tenant_id: str) -> list[Replica]:
        """Usable replicas in the tenant's order of preference (home first): where a stream goes."""
        now = time.monotonic()
        with self._lock:
            usable = [r for r in self._members.values() if r.usable(now)]
        return sorted(usable, key=lambda r: -_score(tenant_id, r.address))

    def home_replica(self, tenant_id: str) -> Replica | None:
        ranked = self.ranked(tenant_id)
        return ranked[0] if ranked else None

    def wait_usable(self, until: float) -> bool:
        """Waits (at most until the monotonic time `until`) for some replica to be usable."""
        with self._room:
            while not any(r.usable(time.monotonic()) for r in self._members.values()):
                left = until - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._room.wait(min(left, 0.1))
            return True

    def acquire(self, tenant_ids: Collection[str] = (), until: float | None = None,
                stop: threading.Event | None = None) -> Replica | None:
        """Blocks until some usable replica has room for one more batch (see try_acquire for the choice);
        None when `until` (monotonic) passes or `stop` is set first."""
        with self._room:
            while (replica := self._pick(tenant_ids)) is None:
                if (until is not None and time.monotonic() >= until) or (stop is not None and stop.is_set()):
                    return None
                self._room.wait(0.1 if until is None else max(0.001, min(0.1, until - time.monotonic())))
            return replica

    def try_acquire(self, tenant_ids: Collection[str] = (), extra: int = 0) -> Replica | None:
        """A replica with room, or None when all usable ones are full (or none is usable): prefers the home of
        most of the batch's tenants, then the one with the fewest batches in flight. `extra`: slots beyond each
        replica's capacity this batch may take (the batcher's pass for tenants with nothing in flight)."""
        with self._lock:
            return self._pick(tenant_ids, extra)

    def _pick(self, tenant_ids, extra: int = 0) -> Replica | None:
        now = time.monotonic()
        members = [r for r in self._members.values() if r.usable(now)]
        if not members:
            return None
        votes: dict[str, int] = {}
        if len(self._members) > 1:
            for tenant_id in set(tenant_ids):
                home = self._home(tenant_id)
                votes[home] = votes.get(home, 0) + 1
        start = next(self._counter) % len(members)
        order = members[start:] + members[:start]
        for replica in sorted(order, key=lambda r: (-votes.get(r.address, 0), r.inflight)):
            if replica.inflight < replica.capacity + extra:
                replica.inflight += 1
                replica.sent += 1
                return replica
        return None

    def claim(self, replica: Replica) -> None:
        """Counts a stream sent to `replica` outside acquire (generation)."""
        with self._lock:
            replica.sent += 1

    def release(self, replica: Replica, failed: bool = False) -> None:
        with self._lock:
            if failed:
                self._failed(replica)
            replica.inflight -= 1
            self._drop_if_idle(replica)
            self._room.notify_all()

    def report_failure(self, replica: Replica) -> None:
        """A call on `replica` found it unreachable (for streams, which hold no in-flight slot)."""
        with self._lock:
            self._failed(replica)
            self._room.notify_all()

    def _failed(self, replica: Replica) -> None:
        replica.failures += 1
        replica.down_until = time.monotonic() + self.down_seconds
        if self._thread is not None:
            replica.healthy = False      # back when a probe says SERVING
        self.discovery.request()


def _score(tenant_id: str, address: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{tenant_id}@{address}".encode(), digest_size=8).digest(), "big")
