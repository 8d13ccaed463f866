"""The compute pipeline prepares the next batch (store I/O) while the current one executes."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from models.adapter_format import random_adapter
from models.dims import ModelDims
from services.compute.adapter_pool import AdapterPool
from services.compute.batch import BatchResult, PackedBatch, SequenceSpec
from services.compute.pipeline import Pipeline
from services.knowledge_store.client import LookupReply

DIMS = ModelDims(family="bert", hidden=8, intermediate=16, layers=2, heads=2, vocab=50, max_positions=32)


class SlowStore:
    """Stands in for the network store: each lookup takes a while and records when it ran."""

    def __init__(self, intervals):
        self.intervals = intervals

    def lookup(self, domain, token_ids, offsets, timeout=None, domain_revision=0):
        begin = time.monotonic()
        time.sleep(0.15)
        self.intervals.append(("fetch", begin, time.monotonic()))
        return LookupReply(np.zeros((len(token_ids), DIMS.hidden), np.float16), [len(token_ids)], 1)


class SlowExecutor:
    device = torch.device("cpu")        # the pipeline's bridge cache places bridges where the executor runs

    def __init__(self, intervals):
        self.intervals = intervals
        self.running = threading.Lock()

    def stage(self, prepared):
        pass   # nothing to copy: the rows stay where the fake store put them

    def run(self, prepared):
        assert self.running.acquire(blocking=False), "two batches executed at once"
        begin = time.monotonic()
        time.sleep(0.15)
        self.intervals.append(("execute", begin, time.monotonic()))
        self.running.release()
        return BatchResult(logits=[np.zeros(2, np.float32)], embeddings=None)


def test_fetch_of_one_batch_overlaps_execution_of_another():
    intervals: list[tuple[str, float, float]] = []
    pool = AdapterPool(DIMS, torch.device("cpu"), slots=4, max_rank=4, host_cache_bytes=1 << 20,
                       fetch=lambda t, v: random_adapter(DIMS, num_labels=2, rank=2, first_layer=1, seed=1))
    pipeline = Pipeline(SlowExecutor(intervals), pool, SlowStore(intervals))
    batch = PackedBatch(np.array([1, 2, 3], np.int32), np.array([0, 3]), [SequenceSpec("t", 1, "d", 1)])
    def call(index: int):
        time.sleep(0.1 * index)   # staggered arrivals: batch i+1 is fetched while batch i executes
        return pipeline.run(batch, timeout=10)

    with ThreadPoolExecutor(4) as callers:
        results = list(callers.map(call, range(4)))
    pipeline.close()
    assert len(results) == 4
    fetches = [(b, e) for kind, b, e in intervals if kind == "fetch"]
    executes = [(b, e) for kind, b, e in intervals if kind == "execute"]
    assert len(fetches) == 4 and len(executes) == 4
    overlapping = [(f, x) for f in fetches for x in executes if f[0] < x[1] and x[0] < f[1]]
    assert overlapping, "no lookup ran while a batch executed: the stages do not overlap"
    # The pipeline measures the same: part of the fetch time was hidden behind execution, never more than all.
    assert 0.0 < pipeline.stats.io_hidden_seconds <= pipeline.stats.io_seconds
    assert 0.0 < pipeline.stats.io_hidden_share <= 1.0
    assert pool.used_slots() == 1 and all(p == 0 for p in pool._pins), "leases must be released"


class ConcurrentExecutor(SlowExecutor):
    """Allows batches side by side and records how many ran at once."""

    def __init__(self, intervals):
        super().__init__(intervals)
        self.lock = threading.Lock()
        self.now = self.most = 0

    def run(self, prepared):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.15)
        with self.lock:
            self.now -= 1
        return BatchResult(logits=[np.zeros(2, np.float32)], embeddings=None)


def test_execution_threads_run_batches_side_by_side():
    pool = AdapterPool(DIMS, torch.device("cpu"), slots=4, max_rank=4, host_cache_bytes=1 << 20,
                       fetch=lambda t, v: random_adapter(DIMS, num_labels=2, rank=2, first_layer=1, seed=1))
    executor = ConcurrentExecutor([])
    pipeline = Pipeline(executor, pool, SlowStore([]), execution_threads=2)
    batch = PackedBatch(np.array([1, 2, 3], np.int32), np.array([0, 3]), [SequenceSpec("t", 1, "d", 1)])
    with ThreadPoolExecutor(4) as callers:
        results = list(callers.map(lambda _: pipeline.run(batch, timeout=10), range(4)))
    pipeline.close()
    assert len(results) == 4 and executor.most == 2
    assert 0.0 <= pipeline.stats.io_hidden_seconds <= pipeline.stats.io_seconds
    assert pool.used_slots() == 1 and all(p == 0 for p in pool._pins), "leases must be released"


class RecordingExecutor:
    device = torch.device("cpu")

    def __init__(self):
        self.batches = []

    def stage(self, prepared):
        pass

    def run(self, prepared):
        self.batches.append([spec.tenant_id for spec in prepared.batch.sequences])
        return BatchResult(logits=[np.full(2, i, np.float32) for i in range(prepared.batch.size)], embeddings=None)


def test_a_stale_tenant_fails_alone_and_dead_work_is_not_run():
    from services.common.errors import Cancelled, StaleVersion

    def fetch(tenant, version):
        if tenant == "replaced":
            raise StaleVersion(f"tenant {tenant!r} has another version")
        return random_adapter(DIMS, num_labels=2, rank=2, first_layer=1, seed=1)

    executor = RecordingExecutor()
    pool = AdapterPool(DIMS, torch.device("cpu"), slots=4, max_rank=4, host_cache_bytes=1 << 20, fetch=fetch)
    pipeline = Pipeline(executor, pool, SlowStore([]))
    specs = [SequenceSpec("a", 1, "d", 1), SequenceSpec("replaced", 1, "d", 1), SequenceSpec("b", 1, "d", 1)]
    batch = PackedBatch(np.array([1, 2, 3, 4, 5, 6], np.int32), np.array([0, 2, 4, 6]), specs)
    result, _ = pipeline.run(batch, timeout=10)
    assert executor.batches == [["a", "b"]]
    assert set(result.failures) == {1} and result.failures[1].stale and "another version" in result.failures[1].message
    assert [r.tolist() for r in result.logits] == [[0.0, 0.0], [], [1.0, 1.0]]
    response = result.to_pb()
    assert [(f.index, f.code) for f in response.failures] == [(1, "FAILED_PRECONDITION")]

    import pytest
    with pytest.raises(Cancelled):
        pipeline.run(batch, timeout=10, wanted=lambda: False)      # the caller went away: nothing executes
    assert len(executor.batches) == 1 and pipeline.stats.dropped_batches == 1
