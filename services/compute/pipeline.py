"""Compute pipeline in three overlapping stages: receive (PLOT lookups + adapter loads, many batches at
once), copy (the batch's PLOT rows to the device in one transfer, on a side CUDA stream) and execute (in
chunks, services/compute/execution_queue.py: the chunks of all waiting batches run in fair order across
tenants).

Each Forward call prepares its batch in its own RPC thread while the execution threads run the batches
before it; the gateway keeps several batches in flight per replica so the stages overlap. On a CPU,
several execution threads (one torch thread each) may run chunks side by side.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from models.bridge import DomainBridge
from services.common.errors import Cancelled, DeadlineExceeded, FailedPrecondition, HMIError, NotFound, Unavailable
from services.common.rpc import peer_unreachable
from services.compute.adapter_pool import AdapterPool
from services.compute.batch import BatchResult, PackedBatch, SequenceFailure
from services.compute.bridge_cache import BridgeCache
from services.compute.coserving import CoServingGate
from services.compute.execution_queue import Chunk, ExecutionQueue
from services.compute.executor import Executor, PreparedBatch
from services.compute.plot_cache import PlotRowCache
from services.knowledge_store.client import StoreClient

log = logging.getLogger("hmi.compute.pipeline")
STAGE_SECONDS = Histogram("hmi_compute_stage_seconds", "time per pipeline stage", ["stage"])
TOKENS = Counter("hmi_compute_tokens_total", "tokens executed")
BATCHES = Counter("hmi_compute_batches_total", "batches executed")
DROPPED = Counter("hmi_compute_dropped_batches_total", "batches not executed: deadline passed or caller gone")
BATCH_SEQUENCES = Histogram("hmi_compute_batch_sequences", "sequences per executed batch",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
EXECUTION_QUEUE = Gauge("hmi_compute_execution_queue_batches", "prepared batches none of whose chunks has started")
DEFAULT_CHUNK_TOKENS = {"cpu": 512, "cuda": 8192}   # a CPU thread runs 512 tokens at ~75 % of a large matmul
REPORT_SECONDS = 30.0


@dataclass
class Timings:
    queue_ms: float = 0.0
    fetch_ms: float = 0.0
    execute_ms: float = 0.0


@dataclass
class PipelineStats:
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    hit_depth_counts: list[int] = field(default_factory=list)
    io_seconds: float = 0.0          # time batches spent preparing (store lookups, adapter loads)
    io_hidden_seconds: float = 0.0   # ... of which the device was busy executing another batch
    adapter_seconds: float = 0.0     # ... of which pinning adapters (fetching the missing ones)
    lookup_seconds: float = 0.0      # ... of which store lookups (side by side with the adapters)
    dropped_batches: int = 0         # deadline passed or caller gone before execution: not run
    failed_sequences: int = 0        # tenant or domain changed or gone: answered as failures, the rest ran

    @property
    def io_hidden_share(self) -> float:
        return self.io_hidden_seconds / self.io_seconds if self.io_seconds else 0.0


class BusyLog:
    """When some batch was executing: enough history to tell how much of a fetch it overlapped."""

    def __init__(self, keep: int = 256) -> None:
        self._lock = threading.Lock()
        self._intervals: deque[tuple[float, float]] = deque(maxlen=keep)
        self._since: float | None = None
        self._running = 0

    def begin(self, at: float) -> None:
        with self._lock:
            self._running += 1
            if self._running == 1:
                self._since = at

    def end(self, at: float) -> None:
        with self._lock:
            self._running -= 1
            if self._running == 0 and self._since is not None:
                self._intervals.append((self._since, at))
                self._since = None

    def overlap(self, start: float, end: float) -> float:
        with self._lock:
            intervals = list(self._intervals) + ([(self._since, end)] if self._since is not None else [])
        return sum(max(0.0, min(e, end) - max(b, start)) for b, e in intervals)


class Pipeline:
    def __init__(self, executor: Executor, pool: AdapterPool, store: StoreClient, *, fetch_workers: int = 8,
                 execution_threads: int = 1, bridges: BridgeCache | None = None,
                 plot_cache: PlotRowCache | None = None, gate: CoServingGate | None = None,
                 chunk_tokens: int = 0) -> None:
        self.executor = executor
        self.gate = gate or CoServingGate()      # told of every batch queued for execution: training yields to it
        self.pool = pool
        self.store = store
        self.plot_cache = plot_cache     # None: every batch's rows come from the store
        self.bridges = bridges or BridgeCache(store, pool.dims.hidden, executor.device)
        self.stats = PipelineStats()
        self._stats_lock = threading.Lock()
        self._fetchers = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="fetch")
        # One on a GPU (one stream, kernels queue anyway); on a CPU with one torch thread per batch,
        # batches executing side by side use the cores better than one batch split across them.
        self.execution_threads = max(1, execution_threads)
        self.chunk_tokens = chunk_tokens or DEFAULT_CHUNK_TOKENS.get(executor.device.type, 8192)
        self.queue = ExecutionQueue(self.execution_threads, self.chunk_tokens)
        EXECUTION_QUEUE.set_function(self.queue.waiting)
        self._last_report = time.monotonic()
        self._busy = BusyLog()

    def prepare(self, batch: PackedBatch,
                timeout: float) -> tuple[PreparedBatch | None, list[int], dict[int, SequenceFailure]]:
        """Lookups per domain and adapter loads run concurrently; a failure releases what was pinned.

        A sequence whose tenant or domain changed or went away since the gateway resolved it (or whose adapter
        is unusable) fails alone: returns the prepared batch of the others (None if none is left), their
        indices in `batch`, and the failures by index."""
        by_domain: dict[tuple[str, int], list[int]] = {}
        for index, spec in enumerate(batch.sequences):
            if spec.split_layer > 0:
                by_domain.setdefault((spec.domain, spec.domain_revision), []).append(index)
        started = time.perf_counter()
        # Each lookup runs with this call's context (request id, trace) on a fetch thread.
        futures = {key: self._fetchers.submit(contextvars.copy_context().run, self._lookup, batch, indices, timeout)
                   for key, indices in by_domain.items()}
        lease = self.pool.acquire([(s.tenant_id, s.adapter_version) for s in batch.sequences], skip_failed=True)
        adapters_done = time.perf_counter()
        try:
            plot_rows: dict[int, np.ndarray] = {}
            bridges: dict[int, DomainBridge] = {}
            failures: dict[int, SequenceFailure] = {}
            lookup_seconds = 0.0
            for key, future in futures.items():
                try:
                    rows, seconds, bridge, lost = future.result()
                except HMIError as error:
                    failures.update(dict.fromkeys(by_domain[key], failure_of(error)))
                    continue
                plot_rows.update(rows)
                failures.update({index: failure_of(error) for index, error in lost.items()})
                if bridge is not None:
                    bridges.update(dict.fromkeys([i for i in by_domain[key] if i in rows], bridge))
                lookup_seconds = max(lookup_seconds, seconds)
            for index, spec in enumerate(batch.sequences):
                error = lease.failed.get((spec.tenant_id, spec.adapter_version))
                if error is not None:
                    failures.setdefault(index, failure_of(error))
            with self._stats_lock:
                self.stats.adapter_seconds += adapters_done - started
                self.stats.lookup_seconds += lookup_seconds
                self.stats.failed_sequences += len(failures)
            ran = [index for index in range(batch.size) if index not in failures]
            if not ran:
                lease.release()
                return None, ran, failures
            if failures:
                plot_rows = {new: plot_rows[old] for new, old in enumerate(ran) if old in plot_rows}
                bridges = {new: bridges[old] for new, old in enumerate(ran) if old in bridges}
                batch = batch.subset(ran)
            prepared = PreparedBatch(batch=batch, plot_rows=plot_rows, lease=lease, bridges=bridges)
            self.executor.stage(prepared)   # copy stage: overlaps the batch executing now
        except BaseException:
            lease.release()
            raise
        return prepared, ran, failures

    def _lookup(self, batch: PackedBatch, indices: list[int], timeout: float
                ) -> tuple[dict[int, np.ndarray], float, DomainBridge | None, dict[int, HMIError]]:
        """The rows of the sequences of one domain (at one revision), how long it took, the domain's bridge for
        them (fetched once per revision), and the sequences that could not get theirs (the store unreachable
        and their rows not cached)."""
        started = time.perf_counter()
        domain = batch.sequences[indices[0]].domain
        revision = batch.sequences[indices[0]].domain_revision
        pieces = [batch.tokens_of(i) for i in indices]
        if self.plot_cache is not None:
            return self._cached_lookup(batch, indices, pieces, timeout, started)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        reply = self.store.lookup(domain, np.concatenate(pieces), offsets, timeout=timeout,
                                  domain_revision=revision)
        self._check_and_count(domain, batch.sequences[indices[0]].split_layer, reply.split_layer,
                              reply.hit_depth_counts)
        bridge = self.bridges.get(domain, reply.bridge_revision, timeout) if reply.bridge_revision else None
        return ({index: reply.vectors[offsets[j]:offsets[j + 1]] for j, index in enumerate(indices)},
                time.perf_counter() - started, bridge, {})

    def _cached_lookup(self, batch: PackedBatch, indices: list[int], pieces: list[np.ndarray], timeout: float,
                       started: float) -> tuple[dict[int, np.ndarray], float, DomainBridge | None, dict[int, HMIError]]:
        spec = batch.sequences[indices[0]]

        def fetch(tokens: np.ndarray, offsets: np.ndarray, context_tokens: np.ndarray | None, known_stamp: str):
            try:
                return self.store.lookup(spec.domain, tokens, offsets, timeout=timeout,
                                         domain_revision=spec.domain_revision, raw=True, known_stamp=known_stamp,
                                         context_tokens=context_tokens)
            except grpc.RpcError as error:
                if not peer_unreachable(error):
                    raise
                raise Unavailable(f"the knowledge store is unreachable ({error.code().name}) and these PLOT rows "
                                  f"are not in compute's row cache; retry when the store is back") from None

        answer = self.plot_cache.lookup(spec.domain, spec.domain_revision, pieces, fetch)
        if answer.rows:
            self._check_and_count(spec.domain, spec.split_layer, answer.split_layer, answer.hit_depth_counts)
        bridge = None
        if answer.rows and answer.bridge_revision:
            bridge = self.bridges.get(spec.domain, answer.bridge_revision, timeout)
        return ({indices[j]: rows for j, rows in answer.rows.items()}, time.perf_counter() - started, bridge,
                {indices[j]: error for j, error in answer.failures.items()})

    def _check_and_count(self, domain: str, expected: int, split_layer: int, hit_depth_counts: list[int]) -> None:
        """The rows are of the split the request was resolved at; their hit depths go into the stats."""
        if split_layer != expected:
            raise FailedPrecondition(f"domain {domain!r} was rebuilt with split layer {split_layer} (the request "
                                     f"said {expected}); retry in a few seconds, when the gateway has the new one")
        with self._stats_lock:
            counts = self.stats.hit_depth_counts
            counts.extend([0] * (len(hit_depth_counts) - len(counts)))
            for depth, count in enumerate(hit_depth_counts):
                counts[depth] += count

    def run(self, batch: PackedBatch, timeout: float,
            wanted: Callable[[], bool] = lambda: True) -> tuple[BatchResult, Timings]:
        """Prepares and executes the batch. Work whose deadline passed or whose caller went away (`wanted`
        False) while it queued is dropped before it runs. Co-served training yields from the batch's arrival
        (its fetches included) until its execution ends."""
        self.gate.inference_begins()
        handed = [False]            # execution (or its cancellation) then tells the gate it ended
        try:
            return self._run(batch, timeout, wanted, handed)
        finally:
            if not handed[0]:
                self.gate.inference_ends()

    def _run(self, batch: PackedBatch, timeout: float, wanted: Callable[[], bool],
             handed: list[bool]) -> tuple[BatchResult, Timings]:
        timings = Timings()
        started = time.perf_counter()
        deadline = started + timeout
        prepared, ran, failures = self.prepare(batch, timeout)
        fetched = time.perf_counter()
        timings.fetch_ms = (fetched - started) * 1e3
        hidden_size = self.pool.dims.hidden
        if prepared is None:
            return BatchResult.merged(batch, ran, None, failures, hidden_size), timings
        hidden = self._busy.overlap(started, fetched)
        spans: list[tuple[float, float]] = []

        def run_chunk(chunk: Chunk) -> BatchResult:
            part = prepared if len(chunk.indices) == prepared.batch.size else prepared.subset(chunk.indices)
            begin = time.perf_counter()
            self._busy.begin(begin)
            try:
                return self.executor.run(part)
            finally:
                end = time.perf_counter()
                self._busy.end(end)
                spans.append((begin, end))

        def still_wanted() -> bool:
            return wanted() and time.perf_counter() <= deadline

        def ended(future) -> None:
            # The lease is released when execution ends, not when the caller gives up: pinned slots
            # must not be reused while the device still reads them.
            prepared.lease.release()
            self.gate.inference_ends()
            if future.cancelled() or isinstance(future.exception(), Cancelled):
                with self._stats_lock:
                    self.stats.dropped_batches += 1
                DROPPED.inc()

        specs = prepared.batch.sequences
        future = self.queue.submit([s.tenant_id for s in specs], np.diff(prepared.batch.offsets).tolist(),
                                   [s.weight for s in specs], run_chunk, wanted=still_wanted)
        handed[0] = True
        future.add_done_callback(ended)
        try:
            parts = future.result(timeout=max(0.05, deadline - time.perf_counter()))
        except FutureTimeout:
            future.cancel()          # not started yet: never runs; else its next chunk sees the deadline passed
            raise DeadlineExceeded(f"batch not executed within the deadline ({timeout:.2f}s)") from None
        except CancelledError:
            raise Cancelled("the caller's deadline passed or it went away while the batch queued: not run") from None
        result = parts[0][1] if len(parts) == 1 else BatchResult.joined(
            [(chunk.indices, part) for chunk, part in parts], prepared.batch, hidden_size)
        begin, end = min(b for b, _ in spans), max(e for _, e in spans)
        if failures:
            result = BatchResult.merged(batch, ran, result, failures, hidden_size)
        timings.queue_ms = (begin - fetched) * 1e3          # until its first chunk started
        timings.execute_ms = (end - begin) * 1e3            # first chunk's start to last chunk's end
        STAGE_SECONDS.labels("fetch").observe(timings.fetch_ms / 1e3)
        STAGE_SECONDS.labels("execute").observe(timings.execute_ms / 1e3)
        TOKENS.inc(len(prepared.batch.token_ids))
        BATCHES.inc()
        BATCH_SEQUENCES.observe(prepared.batch.size)
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.sequences += len(ran)
            self.stats.tokens += len(prepared.batch.token_ids)
            self.stats.io_seconds += fetched - started
            self.stats.io_hidden_seconds += hidden
            report = time.monotonic() - self._last_report > REPORT_SECONDS
            if report:
                self._last_report = time.monotonic()
        if report:
            pool = self.pool.stats
            log.info("%d batches, %d sequences, %d tokens so far (%d batches dropped: deadline passed or caller gone; "
                     "%d sequences failed: tenant or domain changed); adapters: %d device hits, %d host hits, "
                     "%d fetched, %d evictions; PLOT hits per context depth %s; %.0f%% of fetch time hidden behind "
                     "execution; fetch per batch %.1f ms (adapters %.1f, lookups %.1f); last batch %d seqs: fetch "
                     "%.1f ms, execute %.1f ms", self.stats.batches, self.stats.sequences, self.stats.tokens,
                     self.stats.dropped_batches, self.stats.failed_sequences, pool.device_hits, pool.host_hits,
                     pool.misses, pool.evictions, self.stats.hit_depth_counts,
                     100 * self.stats.io_hidden_share, 1e3 * self.stats.io_seconds / self.stats.batches,
                     1e3 * self.stats.adapter_seconds / self.stats.batches,
                     1e3 * self.stats.lookup_seconds / self.stats.batches, batch.size, timings.fetch_ms,
                     timings.execute_ms)
            if self.plot_cache is not None:
                cache = self.plot_cache
                log.info("PLOT rows: %.0f%% of %d from compute's row cache (%d rows held)",
                         100 * cache.hits / max(1, cache.hits + cache.misses), cache.hits + cache.misses,
                         cache.rows_held)
        return result, timings

    def close(self) -> None:
        self._fetchers.shutdown(wait=False, cancel_futures=True)
        self.queue.close()


def failure_of(error: HMIError) -> SequenceFailure:
    """A tenant's or domain's own error: NOT_FOUND and FAILED_PRECONDITION mean it changed or went away since
    the gateway resolved it (stale), which resolving it again may fix."""
    return SequenceFailure(error.code_name, str(error), stale=isinstance(error, (NotFound, FailedPrecondition)))
