"""Gateway batching: bounded queue, token and tenant limits per batch (no services needed)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.common.errors import DeadlineExceeded, ResourceExhausted
from services.gateway.batcher import Batcher, BatcherSettings, SequenceWork
from services.gateway.directory import TenantRoute
from services.gateway.router import Router


def work(tenant: str, tokens: int) -> SequenceWork:
    route = TenantRoute(tenant, ("a", "b"), 1, "d", 0)
    return SequenceWork(np.arange(tokens, dtype=np.int32), route, time.monotonic() + 5, False)


class RecordingBatcher(Batcher):
    """Records the batches it forms instead of sending them to compute."""

    def __init__(self, *args, **kwargs):
        self.batches: list[list[SequenceWork]] = []
        super().__init__(*args, **kwargs)

    def _dispatch(self, batch, replica):
        self.router.release(replica)
        self.batches.append(batch)
        for item in batch:
            item.future.set_result(None)


def test_full_queue_is_resource_exhausted():
    router = Router(["127.0.0.1:1"], inflight_per_replica=0)  # no room: the batcher blocks, the queue fills
    # At most 2 sequences in the blocked batch, 1 carried over and 3 queued: the 7th submit must fail.
    batcher = Batcher(router, BatcherSettings(max_queue=3, max_wait_ms=1, max_batch_tokens=8))
    try:
        with pytest.raises(ResourceExhausted, match="queue is full"):
            for _ in range(10):
                batcher.submit([work("t", 4)])
    finally:
        router.replicas[0].capacity = 1  # let the blocked dispatch go (it fails fast: nothing listens)
        batcher.close()


def test_batches_respect_token_and_tenant_limits():
    batcher = RecordingBatcher(Router(["127.0.0.1:1"]), BatcherSettings(max_batch_tokens=20, max_batch_tenants=2,
                                                                         max_wait_ms=50))
    try:
        items = [work(f"t{i % 3}", 6) for i in range(9)]
        batcher.submit(items)
        for item in items:
            item.future.result(timeout=5)
    finally:
        batcher.close()
    assert sum(len(b) for b in batcher.batches) == 9
    for batch in batcher.batches:
        assert sum(len(item.token_ids) for item in batch) <= 20
        assert len({item.route.tenant_id for item in batch}) <= 2
    assert any(len(b) > 1 for b in batcher.batches), "sequences waiting together must share a batch"


def test_router_prefers_each_tenants_home_replica_and_spills_when_it_is_full_or_down():
    router = Router(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"], inflight_per_replica=1)
    homes = {t: router.home(t) for t in (f"tenant-{i}" for i in range(60))}
    assert set(homes.values()) == {0, 1, 2}, "tenants spread over every replica"
    reordered = Router(["10.0.0.3:1", "10.0.0.1:1", "10.0.0.2:1"])
    assert all(reordered.replicas[reordered.home(t)].address == router.replicas[h].address for t, h in homes.items())
    smaller = Router(["10.0.0.1:1", "10.0.0.3:1"])   # a replica leaves: only its tenants move
    moved = [t for t, h in homes.items() if h != 1 and smaller.replicas[smaller.home(t)].address
             != router.replicas[h].address]
    assert not moved
    tenant = "tenant-7"
    home = router.replicas[homes[tenant]]
    first = router.acquire([tenant])
    assert first is home
    second = router.acquire([tenant])          # home is full: spill to another replica
    assert second is not home
    router.release(first)
    router.release(second)
    assert router.acquire([tenant]) is home    # room again at home
    router.release(home, failed=True)          # home fails: avoided while marked down
    assert router.acquire([tenant]) is not home
    # A batch goes to the home of most of its tenants.
    majority = [t for t, h in homes.items() if h == 2][:3] + [t for t, h in homes.items() if h == 0][:1]
    fresh = Router(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"], inflight_per_replica=4)
    assert fresh.acquire(majority) is fresh.replicas[2]


def test_batches_grow_while_every_replica_is_busy():
    """With the only replica's batches in flight, everything queued meanwhile leaves as one batch; with no
    heavy tenant's batch in flight, nobody passes on the slot beyond capacity."""
    router = Router(["127.0.0.1:1"], inflight_per_replica=1)
    busy = router.acquire(["other"])
    batcher = RecordingBatcher(router, BatcherSettings(max_batch_tokens=1000, max_batch_tenants=64, max_wait_ms=1))
    try:
        items = [work(f"t{i % 3}", 5) for i in range(12)]
        for item in items:
            batcher.submit([item])
            time.sleep(0.01)        # far beyond max_wait: without backpressure each would go alone
        assert all(item.light for item in items), "nobody holds 16 sequences: nobody is heavy"
        assert not any(item.future.done() for item in items), "no heavy batch in flight: they wait for the slot"
        router.release(busy)
        for item in items:
            item.future.result(timeout=5)
    finally:
        batcher.close()
    assert [len(b) for b in batcher.batches] == [12]


def test_light_tenant_passes_a_flood_waiting_for_a_slot():
    """While a flooding tenant's batches hold the slots and more of its sequences wait, a request of another
    tenant leaves first, as a batch of its own on the slot beyond capacity, and the flood still waits."""
    router = Router(["127.0.0.1:1"], inflight_per_replica=1)
    batcher = RecordingBatcher(router, BatcherSettings(max_batch_tokens=40, max_batch_tenants=64, max_wait_ms=1))
    # The recording batcher never answers through compute: sent sequences stay held (in flight) by their tenant.
    flood = [work("heavy", 2) for _ in range(40)]
    try:
        batcher.submit(flood[:20])                      # light: the tenant held nothing when it came
        batcher.submit(flood[20:24])                    # heavy: it holds 20, all there is
        for item in flood[:24]:
            item.future.result(timeout=5)
        assert all(item.light for item in flood[:20]) and not any(item.light for item in flood[20:24])
        busy = router.acquire(["other"])                # the only slot is taken
        batcher.submit(flood[24:])
        time.sleep(0.05)
        light = work("light", 3)
        batcher.submit([light])
        light.future.result(timeout=5)
        assert light.light and not any(item.future.done() for item in flood[24:])
        assert [item.route.tenant_id for item in batcher.batches[-1]] == ["light"]
        router.release(busy)
        for item in flood:
            item.future.result(timeout=5)
    finally:
        batcher.close()
    assert all(len({item.light for item in batch}) == 1 for batch in batcher.batches), "light and heavy mixed"


def test_router_acquire_waits_for_a_release():
    router = Router(["127.0.0.1:1"], inflight_per_replica=1)
    first = router.acquire()
    assert router.try_acquire() is None
    threading.Timer(0.2, router.release, args=(first,)).start()
    begin = time.monotonic()
    assert router.acquire() is first
    assert 0.15 < time.monotonic() - begin < 2


def test_admission_is_all_or_nothing_and_costs_tokens():
    router = Router(["127.0.0.1:1"], inflight_per_replica=0)    # nothing leaves: the queue only fills
    batcher = Batcher(router, BatcherSettings(max_queue=100, max_queue_tokens=40, max_wait_ms=1, max_batch_tokens=4))
    try:
        batcher.submit([work("a", 4)])          # a full batch of its own, blocked waiting for a replica
        waited = time.monotonic() + 5
        while batcher.queued() != (0, 0) and time.monotonic() < waited:
            time.sleep(0.01)
        batcher.submit([work("b", 10), work("b", 10)])
        assert batcher.queued() == (2, 20)
        with pytest.raises(ResourceExhausted, match="25 tokens was not queued"):
            batcher.submit([work("c", 5)] * 5)      # 25 more tokens do not fit: none of them is queued
        assert batcher.queued() == (2, 20)
        batcher.submit([work("d", 10), work("d", 10)])  # exactly fits
        assert batcher.queued() == (4, 40)
    finally:
        router.replicas[0].capacity = 1
        batcher.close()


def test_expired_and_abandoned_work_never_reaches_compute():
    router = Router(["127.0.0.1:1"], inflight_per_replica=1)
    busy = router.acquire(["other"])            # the only replica is busy: work waits at the gateway
    passed = router.try_acquire(["other"], extra=1)     # its slot for light tenants too
    assert passed is busy and router.try_acquire(["other"], extra=1) is None
    batcher = RecordingBatcher(router, BatcherSettings(max_batch_tokens=1000, max_wait_ms=1))
    try:
        expired = work("late", 5)
        expired.deadline = time.monotonic() + 0.05
        abandoned = work("gone", 5)
        alive = work("alive", 5)
        batcher.submit([expired])
        batcher.submit([abandoned])
        batcher.submit([alive])
        abandoned.future.cancel()               # its caller went away
        time.sleep(0.2)                         # the deadline passes while everything waits
        router.release(busy)
        router.release(passed)
        alive.future.result(timeout=5)
        with pytest.raises(DeadlineExceeded):
            expired.future.result(timeout=5)
    finally:
        batcher.close()
    sent = [item.route.tenant_id for batch in batcher.batches for item in batch]
    assert sent == ["alive"] and batcher.dropped == 2


def test_a_conversations_turns_go_to_one_replica_and_a_tenants_conversations_spread():
    from services.gateway.generation import generation_affinity
    router = Router(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"])

    def first(tenant: str, session: str = "") -> str:
        return router.ranked(generation_affinity(tenant, session))[0].address

    assert first("writer") == router.home_address("writer")          # no session: the tenant's home
    sessions = {first("writer", f"chat-{i}") for i in range(30)}
    assert len(sessions) == 3                                          # one tenant's chats use every replica
    assert all(first("writer", "chat-7") == first("writer", "chat-7") for _ in range(5))
    assert generation_affinity("a", "b") != generation_affinity("ab", "") != generation_affinity("a\x00b")
