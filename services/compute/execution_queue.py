"""Compute's execution queue: batches run in chunks, and the chunks of every waiting batch run in fair order
across tenants, so a light tenant's sequence waits behind at most the chunks already executing, not behind
whole batches full of another tenant that arrived before it.

Each sequence gets a start-time fair queuing tag when its batch arrives (services/common/fair_queue.py's rule:
per tenant, `max(virtual time, the tenant's last finish)`, the finish `start + tokens / weight`), shared by
every gateway that sends to this replica. A batch's sequences, in tag order, are cut into chunks of at most
`chunk_tokens`; a chunk's tag is its first sequence's. Execution threads always take the waiting chunk with
the smallest tag, so a tenant that sent little gets the next chunk even while another tenant's backlog fills
the queue, and the gateway may send bigger batches without making anyone wait for them.

Plain Python and torch-free: the work is a callable, which the pipeline gives (run a sub-batch)."""
from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from services.common.errors import Cancelled

R = TypeVar("R")            # what running one chunk gives

IDLE_TENANTS_KEPT = 4096    # finish tags remembered for tenants owed nothing beyond that are forgotten


@dataclass
class Chunk:
    """Some of a batch's sequences (indices into it, in tag order), run together."""
    indices: list[int]
    tokens: int
    tag: float


@dataclass(eq=False)
class _Job(Generic[R]):
    chunks: list[Chunk]
    run: Callable[[Chunk], R]
    wanted: Callable[[], bool]
    future: Future
    results: dict[int, R] = field(default_factory=dict)      # chunk number -> its result
    left: int = 0
    started: bool = False
    failed: bool = False


class ExecutionQueue:
    def __init__(self, threads: int, chunk_tokens: int, *, name: str = "execute") -> None:
        self.chunk_tokens = max(1, chunk_tokens)
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, _Job, int]] = []      # (tag, arrival order, job, chunk number)
        self._order = itertools.count()
        self._finish: dict[str, float] = {}
        self._virtual = 0.0
        self._jobs_waiting = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def waiting(self) -> int:
        """Batches with chunks not started yet."""
        with self._lock:
            return self._jobs_waiting

    def plan(self, tenants: Sequence[str], tokens: Sequence[int], weights: Sequence[float]) -> list[Chunk]:
        """Tags the sequences (advancing their tenants' finish tags) and cuts them into chunks in tag order.
        Called under the lock by `submit`; public so tests can check the order alone."""
        tags = []
        for tenant, count, weight in zip(tenants, tokens, weights):
            start = max(self._virtual, self._finish.get(tenant, 0.0))
            self._finish[tenant] = start + count / (weight if weight > 0 else 1.0)
            tags.append(start)
        chunks: list[Chunk] = []
        for index in sorted(range(len(tags)), key=lambda i: (tags[i], i)):
            if chunks and chunks[-1].tokens + tokens[index] <= self.chunk_tokens:
                chunks[-1].indices.append(index)
                chunks[-1].tokens += tokens[index]
            else:
                chunks.append(Chunk([index], tokens[index], tags[index]))
        if len(self._finish) > IDLE_TENANTS_KEPT:
            self._finish = {t: f for t, f in self._finish.items() if f > self._virtual}
        return chunks

    def submit(self, tenants: Sequence[str], tokens: Sequence[int], weights: Sequence[float],
               run: Callable[[Chunk], R], wanted: Callable[[], bool] = lambda: True) -> Future:
        """Queues a batch; the future gives `[(chunk, result)]` in chunk order once every chunk ran, or the first
        chunk's exception (the rest is then skipped). `wanted()` is asked before each chunk starts: once False
        the batch stops and its future is cancelled."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the execution queue is closed")
            chunks = self.plan(tenants, tokens, weights)
            job = _Job(chunks, run, wanted, future, left=len(chunks))
            for number, chunk in enumerate(chunks):
                heapq.heappush(self._heap, (chunk.tag, next(self._order), job, number))
            self._jobs_waiting += 1
            self._lock.notify(len(chunks))
        return future

    def _next(self) -> tuple[_Job, int] | None:
        with self._lock:
            while True:
                while not self._heap and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return None
                tag, _, job, number = heapq.heappop(self._heap)
                if job.failed:
                    continue
                if not job.started:
                    job.started = True
                    self._jobs_waiting -= 1
                    if not job.future.set_running_or_notify_cancel():      # its caller gave up while it waited
                        job.failed = True
                        continue
                self._virtual = max(self._virtual, tag)
                return job, number

    def _work(self) -> None:
        while (taken := self._next()) is not None:
            job, number = taken
            if not job.wanted():
                self._fail(job, None)
                continue
            try:
                result = job.run(job.chunks[number])
            except BaseException as error:  # noqa: BLE001 - the batch's caller gets it; the thread lives on
                self._fail(job, error)
                continue
            with self._lock:
                if job.failed:
                    continue
                job.results[number] = result
                job.left -= 1
                done = job.left == 0
            if done:
                job.future.set_result([(job.chunks[n], job.results[n]) for n in range(len(job.chunks))])

    def _fail(self, job: _Job, error: BaseException | None) -> None:
        with self._lock:
            if job.failed:
                return
            job.failed = True
        job.future.set_exception(error or Cancelled("the caller's deadline passed or it went away while the batch "
                                                    "queued: not run"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = [job for _, _, job, _ in self._heap]
            self._heap.clear()
            self._lock.notify_all()
        for job in pending:
            if not job.failed and not job.future.done():
                job.failed = True
                if not job.future.cancel():
                    job.future.set_exception(Cancelled("compute is stopping"))
