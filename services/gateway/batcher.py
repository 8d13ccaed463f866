"""Dynamic batching across tenants: sequences wait at most `max_wait` for company, longer only while
every compute replica already has its batches in flight (then the batch grows until one has room), a
batch holds at most `max_batch_tokens` tokens and `max_batch_tenants` distinct adapters, and the queue
is bounded in sequences and in tokens.

Admission is all or nothing per request and costs its tokens: a request whose sequences do not all fit
is refused whole (RESOURCE_EXHAUSTED) and leaves nothing queued, so under overload compute only runs work
someone still waits for. A request that would wait in the queue longer than its deadline leaves (the tokens
fair queuing serves before it, at the rate compute drains the queue: services/gateway/queue_wait.py) is
refused at once with RESOURCE_EXHAUSTED (`queue_wait`) and a retry hint, instead of spending its deadline.
Each tenant may hold at most its `max_queued` sequences (its limit, else
`max_queue_per_tenant`), so one tenant cannot fill the queue for everyone. Sequences whose deadline passed or
whose caller went away (their future was cancelled) are dropped when a batch is formed, before any compute
sees them.

Batches are filled in fair order across tenants (services/common/fair_queue.py: start-time fair queuing by
tokens, weighted by each tenant's priority), so a tenant flooding the queue delays a light tenant's sequence by
at most one of its own, not by its whole backlog. The queues after this one are fair too: compute runs the
chunks of every batch it holds in fair order (services/compute/execution_queue.py), and a request of a tenant
that is not heavy when it comes (heavy: it holds HEAVY_MIN_SEQUENCES or more of this gateway's sequences,
queued and in flight, and at least an equal share of them) need not wait for slots a heavy tenant's batches
hold. Light and heavy sequences never share a batch (a light one would wait for the heavy batch's whole
answer); while heavy sequences are in flight, a light batch may take one slot beyond a replica's
`--inflight-per-compute`, and while a batch being formed waits for a slot, light sequences queued behind it
go out as a batch of their own on that slot. So a light tenant waits behind at most the chunks compute is
executing, not behind the flood's batches in flight; ordinary traffic, where nobody is heavy, batches as
before.

A batch waits for a usable replica within its sequences' deadlines (none is usable while every replica is
down or restarting). A batch that fails because its replica could not be reached (UNAVAILABLE from the
replica itself, not from a peer behind it) produced no result, so its sequences go back to the head of the
queue and run on another replica, or on the same one once it is back, within their deadlines.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Histogram

from services.common import tracing
from services.common.call_context import current_request_id, joined
from services.common.errors import Cancelled, DeadlineExceeded, HMIError, LimitExceeded
from services.common.fair_queue import FairQueue
from services.compute.client import ForwardReply, ReplicaUnreachable, Sequence, SequenceFailure, SequenceOutput, forward
from services.gateway.access import REFUSED
from services.gateway.directory import TenantRoute
from services.gateway.queue_wait import DrainRate, tokens_ahead
from services.gateway.router import Router
from services.gateway.settings import BatcherSettings  # noqa: F401 - the batcher's settings, defined once there

log = logging.getLogger("hmi.gateway.batcher")
BATCH_SEQUENCES = Histogram("hmi_gateway_batch_sequences", "sequences per batch",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
BATCH_TOKENS = Histogram("hmi_gateway_batch_tokens", "tokens per batch",
                         buckets=(16, 64, 256, 1024, 2048, 4096, 8192, 16384))
RETRIED = Counter("hmi_gateway_retried_sequences_total", "sequences sent again after their replica could not be "
                  "reached (no result had been produced)")
BATCH_FAILURES = Counter("hmi_gateway_batch_failures_total", "batches that failed", ["code"])
DROPPED = Counter("hmi_gateway_dropped_sequences_total", "sequences dropped before compute: deadline passed or "
                  "caller gone")
BATCH_STAGE_SECONDS = Histogram("hmi_gateway_batch_stage_seconds", "where a batch's time went: waiting in the gateway, "
                                "and compute's fetch, queue and execute stages", ["stage"])
STAGES = ("gateway_wait", "fetch", "queue", "execute", "round_trip")
# A tenant is heavy while it holds at least this many sequences here (queued or in flight) and at least an
# equal share of all of them. Below it a tenant's work is a small batch that delays nobody much, and ordinary
# traffic of many tenants with a request or two each keeps batching as one class.
HEAVY_MIN_SEQUENCES = 16


@dataclass
class SequenceWork:
    token_ids: np.ndarray
    route: TenantRoute
    deadline: float                     # time.monotonic() seconds
    want_embedding: bool
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)
    request_id: str = field(default_factory=current_request_id)
    trace: Any = field(default_factory=tracing.capture)      # the request's trace context (tracing on)
    started: bool = False               # sent to compute once (its future is running)
    abandoned: bool = False             # the caller went away after it was sent
    light: bool = False                 # its tenant was not heavy (HEAVY_MIN_SEQUENCES) when it came
    active: bool = False                # queued or in flight, counted in the batcher's `_active`

    def sequence(self) -> Sequence:
        route = self.route
        return Sequence(route.tenant_id, route.adapter_version, route.domain, route.split_layer, route.model,
                        route.domain_revision, self.token_ids, self.want_embedding, route.limits.weight)

    def abandon(self) -> None:
        """The caller no longer waits: drop it wherever it is (queued, or queued again for a retry)."""
        self.abandoned = True
        self.future.cancel()



def _count_down(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


SequenceResult = SequenceOutput     # what a sequence's future gives: its logits and embedding


class SequenceFailed(HMIError):
    """Compute could not run this sequence for a reason of its own tenant or domain (the rest of its batch
    ran); `stale`: the tenant or domain changed since it was resolved, so resolving it again may fix it."""

    def __init__(self, code_name: str, message: str, stale: bool) -> None:
        super().__init__(message)
        self.code_name = code_name
        self.stale = stale


@dataclass
class _Forming:
    """A batch being formed: its items, token count and tenants, and whether a limit closed it."""
    items: list[SequenceWork]
    tokens: int
    tenants: set[str]
    light: bool                 # its sequences are light ones (all of them)
    full: bool = False


class Batcher:
    def __init__(self, router: Router, settings: BatcherSettings) -> None:
        self.router = router
        self.settings = settings
        self._queue: FairQueue[SequenceWork] = FairQueue()
        self._queued_tokens = 0
        self._queue_lock = threading.Condition()
        self._carry: SequenceWork | None = None
        self._active: dict[str, int] = {}    # tenant -> its sequences queued or in flight, not answered yet
        self._active_total = 0
        self._light: dict[str, int] = {}     # tenant -> its light sequences still queued
        self._drain = DrainRate()            # tokens/s compute answers while work waits here
        self._heavy_sent = 0                 # sequences of heavy tenants sent to compute, not answered yet
        self._aside: list[SequenceWork] = []     # light sequences taken while a batch of others waited for a slot
        self._retry: deque[SequenceWork] = deque()     # sequences whose replica could not be reached
        self.retried = 0
        self.dropped = 0                    # sequences dropped before compute (deadline passed, caller gone)
        self._stop = threading.Event()
        self._sent_batches = 0
        self._sent_sequences = 0
        self._stage_ms = dict.fromkeys(STAGES, 0.0)     # summed over the batches answered since the last report
        self._answered = 0
        self._report_lock = threading.Lock()
        self._last_report = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, items: list[SequenceWork]) -> None:
        """Queues every item or none (RESOURCE_EXHAUSTED): a request (one tenant's) is admitted whole, by its
        tokens, within the queue's bounds and its tenant's `max_queued`."""
        if not items:
            return
        tokens = sum(len(item.token_ids) for item in items)
        route = items[0].route
        tenant_cap = route.limits.max_queued or self.settings.max_queue_per_tenant
        with self._queue_lock:
            waiting = self._queue.flow_length(route.tenant_id)
            if waiting + len(items) > tenant_cap:
                REFUSED.labels("max_queued").inc()
                raise LimitExceeded(f"tenant {route.tenant_id!r} has {waiting} sequences queued at this gateway, its "
                                    f"limit (max_queued) is {tenant_cap}; this request of {len(items)} was not "
                                    f"queued: back off and retry", "max_queued", 0.1)
            rate = self._drain.rate
            if (len(self._queue) + len(items) > self.settings.max_queue
                    or self._queued_tokens + tokens > self.settings.max_queue_tokens):
                REFUSED.labels("max_queue").inc()
                raise LimitExceeded(
                    f"the gateway queue is full ({len(self._queue)} sequences, {self._queued_tokens} tokens waiting; "
                    f"limits --max-queue {self.settings.max_queue}, --max-queue-tokens "
                    f"{self.settings.max_queue_tokens}); this request of {len(items)} sequences, {tokens} tokens "
                    f"was not queued: back off and retry", "max_queue",
                    min(10.0, tokens / rate) if rate else 0.5)
            if rate and self._queue:
                own = self._queue.flow_cost(route.tenant_id)
                backlogged = self._queue.backlogged + (0 if own else 1)
                wait = tokens_ahead(self._queue.cost, own, tokens, backlogged, route.limits.weight) / rate
                left = min(item.deadline for item in items) - time.monotonic()
                if wait > left:
                    REFUSED.labels("queue_wait").inc()
                    raise LimitExceeded(
                        f"this request ({tokens} tokens) would wait about {wait:.1f} s in the gateway queue "
                        f"({self._queued_tokens} tokens of {backlogged} tenants queued, served fairly at about "
                        f"{rate:.0f} tokens/s), more than the {max(0.0, left):.1f} s its deadline leaves: not "
                        f"queued; retry later or with a longer deadline", "queue_wait", min(10.0, wait - left))
            mine = self._active.get(route.tenant_id, 0)
            light = mine < HEAVY_MIN_SEQUENCES or mine * len(self._active) < self._active_total
            for item in items:
                item.light, item.active = light, True
                self._queue.push(item.route.tenant_id, item, cost=len(item.token_ids), weight=item.route.limits.weight)
            self._active[route.tenant_id] = mine + len(items)
            self._active_total += len(items)
            if light:
                self._light[route.tenant_id] = self._light.get(route.tenant_id, 0) + len(items)
            self._queued_tokens += tokens
            self._queue_lock.notify()

    def queued(self) -> tuple[int, int]:
        """Sequences and tokens waiting."""
        with self._queue_lock:
            return len(self._queue), self._queued_tokens

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _take(self, timeout: float) -> SequenceWork | None:
        """The next live item (waiting up to `timeout`); items nobody waits for any more are dropped here."""
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        deadline = time.monotonic() + timeout
        while True:
            with self._queue_lock:
                if self._retry:
                    item = self._retry.popleft()
                    if self._live(item):
                        return item
                    continue
                while not self._queue and not self._retry:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._queue_lock.wait(left):
                        if not self._queue and not self._retry:
                            return None
                if not self._queue:
                    continue
                item = self._queue.pop()
                self._taken(item)
            if self._live(item):
                return item

    def _taken(self, item: SequenceWork) -> None:
        """Bookkeeping of an item leaving the queue (the caller holds the queue lock)."""
        self._queued_tokens -= len(item.token_ids)
        if item.light:
            _count_down(self._light, item.route.tenant_id)

    def _settle(self, item: SequenceWork) -> None:
        """The item is answered or dropped: its tenant holds one sequence less (once per item)."""
        with self._queue_lock:
            if not item.active:
                return
            item.active = False
            self._active_total -= 1
            if item.started and not item.light:
                self._heavy_sent -= 1
            _count_down(self._active, item.route.tenant_id)

    def _live(self, item: SequenceWork) -> bool:
        """False (and the item answered) when its caller went away or its deadline passed."""
        if item.future.cancelled() or item.abandoned:
            if item.started and not item.future.done():
                item.future.set_exception(Cancelled("the caller went away"))
            self._settle(item)
            self.dropped += 1
            DROPPED.inc()
            return False
        if time.monotonic() >= item.deadline:
            if item.started or item.future.set_running_or_notify_cancel():
                item.future.set_exception(DeadlineExceeded("the deadline passed while the request queued at the "
                                                           "gateway; it was not computed"))
            self._settle(item)
            self.dropped += 1
            DROPPED.inc()
            return False
        return True

    def _start(self, item: SequenceWork) -> bool:
        """Marks a live item as sent (its future running); False when its caller left just now."""
        if item.started:
            return True
        item.started = item.future.set_running_or_notify_cancel()
        if not item.started:
            self._settle(item)
        elif not item.light:
            with self._queue_lock:
                self._heavy_sent += 1
        return item.started

    def _loop(self) -> None:
        while not self._stop.is_set():
            aside, self._aside = self._aside, []    # light sequences a sent batch left aside go first
            first = aside.pop(0) if aside else self._take(0.1)
            if first is None:
                continue
            batch = _Forming([first], len(first.token_ids), {first.route.tenant_id}, first.light,
                             full=len(first.token_ids) >= self.settings.max_batch_tokens)
            while aside and not batch.full:
                self._add(batch, aside.pop(0))
            self._aside = aside + self._aside
            closes = time.monotonic() + self.settings.max_wait_ms / 1e3
            while not batch.full:
                item = self._take(max(0.0, closes - time.monotonic()))
                if item is None:
                    break
                self._add(batch, item)
            # While every replica is busy the batch keeps growing: under load batches get as big as the
            # replicas can absorb, instead of queueing many small ones (per-batch work is paid once).
            replica = self._acquire(batch)
            while (replica is None and not batch.full and not self._stop.is_set()
                   and self.router.usable_count()):
                item = self._take(0.001)
                if item is not None:
                    self._add(batch, item)
                self._send_light()
                replica = self._acquire(batch)
            if replica is None:   # every replica full, or none usable: wait within the batch's deadlines
                until = max(item.deadline for item in batch.items)
                while replica is None and not self._stop.is_set() and time.monotonic() < until:
                    self._send_light()
                    replica = (self.router.acquire(batch.tenants, until=min(until, time.monotonic() + 0.002),
                                                   stop=self._stop) or self._acquire(batch))
            if replica is None:
                for item in batch.items:
                    self._live(item)        # all expired waiting (or stopping): answered and dropped
                continue
            items = [item for item in batch.items if self._live(item) and self._start(item)]
            if items:
                self._dispatch(items, replica)
            else:
                self.router.release(replica)

    def _acquire(self, batch: "_Forming") -> object | None:
        """A slot for the batch: one beyond the replicas' capacity when it holds light sequences and a heavy
        tenant's batches hold slots."""
        return self.router.try_acquire(batch.tenants, extra=1 if batch.light and self._heavy_sent else 0)

    def _send_light(self) -> None:
        """While the batch being formed waits for a slot: light sequences queued behind it (or carried over
        from it) go out now as a batch of their own, on a slot beyond capacity when one is free."""
        carried = self._carry is not None and self._carry.light
        if not self._heavy_sent or (not carried and not self._light and not self._aside):
            return
        with self._queue_lock:
            tenants = list(self._light)[:self.settings.max_batch_tenants]
        items, self._aside = self._aside, []
        if carried:
            items.append(self._carry)
            self._carry = None
        replica = self.router.try_acquire(tenants + [item.route.tenant_id for item in items], extra=1)
        if replica is None:
            self._aside = items
            return
        tokens = sum(len(item.token_ids) for item in items)
        with self._queue_lock:
            for tenant in tenants:
                # The tenant's items up to its last light one (any before it are its own, so they may ride along).
                while self._light.get(tenant) and tokens < self.settings.max_batch_tokens:
                    item = self._queue.pop_flow(tenant)
                    if item is None:             # cannot happen (light items are queued); stay consistent
                        self._light.pop(tenant, None)
                        break
                    self._taken(item)
                    items.append(item)
                    tokens += len(item.token_ids)
        items = [item for item in items if self._live(item) and self._start(item)]
        if items:
            self._dispatch(items, replica)
        else:
            self.router.release(replica)

    def _add(self, batch: "_Forming", item: SequenceWork) -> None:
        """Adds the item, or carries it over to the next batch (and closes this one) when a limit says no.
        Light and other sequences do not share a batch: a light one would wait for the others' whole batch
        (it goes aside, to be sent on its own), and others would not ride a light batch's extra slot."""
        if item.light != batch.light:
            if item.light:
                self._aside.append(item)
            else:
                self._carry = item
                batch.full = True
            return
        new_tenant = item.route.tenant_id not in batch.tenants
        if (batch.tokens + len(item.token_ids) > self.settings.max_batch_tokens
                or (new_tenant and len(batch.tenants) >= self.settings.max_batch_tenants)):
            self._carry = item
            batch.full = True
            return
        batch.items.append(item)
        batch.tokens += len(item.token_ids)
        batch.tenants.add(item.route.tenant_id)
        batch.full = batch.tokens >= self.settings.max_batch_tokens

    def _dispatch(self, batch: list[SequenceWork], replica) -> None:
        sequences = [item.sequence() for item in batch]
        timeout = max(0.05, max(item.deadline for item in batch) - time.monotonic())
        BATCH_SEQUENCES.observe(len(batch))
        BATCH_TOKENS.observe(sum(len(item.token_ids) for item in batch))
        self._sent_batches += 1
        self._sent_sequences += len(batch)
        sent = time.monotonic()
        forward(replica.stub, sequences, timeout, lambda result: self._complete(result, batch, replica, sent),
                traces=[item.trace for item in batch], request_ids=joined(item.request_id for item in batch))

    def _requeue(self, batch: list[SequenceWork]) -> bool:
        """Puts a batch that never ran back at the head of the queue (False when stopping)."""
        if self._stop.is_set():
            return False
        with self._queue_lock:
            self._retry.extend(batch)
            self._queue_lock.notify()
        self.retried += len(batch)
        RETRIED.inc(len(batch))
        return True

    def _account(self, batch: list[SequenceWork], sent: float, reply: ForwardReply) -> None:
        """Where the time of an answered batch went; logged as means every 30 s (and as histograms)."""
        stages = {"gateway_wait": 1e3 * (sent - min(item.queued_at for item in batch)), "fetch": reply.fetch_ms,
                  "queue": reply.queue_ms, "execute": reply.execute_ms,
                  "round_trip": 1e3 * (time.monotonic() - sent)}
        for stage, ms in stages.items():
            BATCH_STAGE_SECONDS.labels(stage).observe(ms / 1e3)
        with self._report_lock:
            self._answered += 1
            for stage, ms in stages.items():
                self._stage_ms[stage] += ms
            if time.monotonic() - self._last_report < 30.0:
                return
            means = {stage: total / self._answered for stage, total in self._stage_ms.items()}
            self._stage_ms, self._answered = dict.fromkeys(STAGES, 0.0), 0
            self._last_report = time.monotonic()
        log.info("%d batches, %d sequences sent so far (%.1f per batch); %d waiting, %d dropped (deadline passed or "
                 "caller gone); per batch lately: %.1f ms waiting here, %.1f ms to compute and back (fetch %.1f, "
                 "queue %.1f, execute %.1f)",
                 self._sent_batches, self._sent_sequences, self._sent_sequences / self._sent_batches,
                 self.queued()[0], self.dropped, means["gateway_wait"], means["round_trip"], means["fetch"],
                 means["queue"], means["execute"])

    def _complete(self, result: ForwardReply | HMIError, batch: list[SequenceWork], replica, sent: float) -> None:
        if isinstance(result, HMIError):
            unreachable = isinstance(result, ReplicaUnreachable)
            self.router.release(replica, failed=unreachable)
            BATCH_FAILURES.labels(result.code_name).inc()
            if unreachable and self._requeue(batch):
                log.warning("batch of %d sequences could not reach %s (%s); running it elsewhere", len(batch),
                            replica.address, result)
                return
            log.warning("batch of %d sequences failed on %s: %s %s", len(batch), replica.address, result.code_name,
                        result)
            for item in batch:
                self._settle(item)
                if not item.future.done():
                    item.future.set_exception(result)
            return
        self.router.release(replica)
        self._drain.answered(sum(len(item.token_ids) for item in batch), backlogged=len(self._queue) > 0)
        for item in batch:
            self._settle(item)
        try:
            self._account(batch, sent, result)
            for item, output in zip(batch, result.outputs):
                if isinstance(output, SequenceFailure):
                    item.future.set_exception(SequenceFailed(output.code, output.message, output.stale))
                else:
                    item.future.set_result(output)
        except Exception as error:  # noqa: BLE001 - a malformed reply fails its requests, not the gateway
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
