"""Picks a compute replica for a batch: round robin over replicas, skipping ones that just failed,
with a bound on batches in flight per replica (enough to keep its pipeline full)."""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

from hmi.v1 import compute_pb2_grpc as pb_grpc
from services.common.rpc import channel


@dataclass
class Replica:
    address: str
    stub: pb_grpc.ComputeStub
    slots: threading.Semaphore
    down_until: float = 0.0


class Router:
    def __init__(self, addresses: list[str], *, inflight_per_replica: int = 2, down_seconds: float = 1.0) -> None:
        if not addresses:
            raise ValueError("at least one compute address is needed (HMI_COMPUTE_ADDRS)")
        self.replicas = [Replica(a, pb_grpc.ComputeStub(channel(a)), threading.Semaphore(inflight_per_replica))
                         for a in addresses]
        self.down_seconds = down_seconds
        self._cycle = itertools.cycle(range(len(self.replicas)))
        self._lock = threading.Lock()

    def acquire(self) -> Replica:
        """Blocks until some replica has room for one more batch; prefers replicas not marked down."""
        while True:
            with self._lock:
                order = [next(self._cycle) for _ in self.replicas]
            now = time.monotonic()
            healthy = [self.replicas[i] for i in order if self.replicas[i].down_until <= now]
            for replica in healthy or [self.replicas[i] for i in order]:
                if replica.slots.acquire(blocking=False):
                    return replica
            time.sleep(0.001)

    def release(self, replica: Replica, failed: bool = False) -> None:
        if failed:
            replica.down_until = time.monotonic() + self.down_seconds
        replica.slots.release()
