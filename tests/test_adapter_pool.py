"""Compute's adapter pool: device slots hold exactly the adapter's (scaled, zero-padded) matrices,
the cache tiers count hits and misses, LRU eviction never touches pinned slots, and the store is asked
once per adapter even under concurrency."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from models.adapter_format import Adapter, random_adapter
from models.dims import ModelDims
from services.common.errors import FailedPrecondition, ResourceExhausted
from services.compute.adapter_pool import AdapterPool

DIMS = ModelDims(family="bert", hidden=32, intermediate=64, layers=4, heads=4, vocab=100, max_positions=64)
FIRST = 2
MAX_RANK = 8
BIG_CACHE = 1 << 30


class Store:
    """A fake knowledge store: deterministic adapters per (tenant, version), counting fetches."""

    def __init__(self, delay: float = 0.0) -> None:
        self.adapters: dict[tuple[str, int], Adapter] = {}
        self.calls: Counter = Counter()
        self.delay = delay
        self._lock = threading.Lock()

    def add(self, tenant: str, version: int = 1, *, rank: int = 4, targets=("query", "value"),
            labels: int = 2) -> Adapter:
        seed = 1 + len(self.adapters)
        adapter = random_adapter(DIMS, num_labels=labels, rank=rank, first_layer=FIRST, targets=targets,
                                 alpha=3.0 * rank, seed=seed)
        self.adapters[(tenant, version)] = adapter
        return adapter

    def __call__(self, tenant: str, version: int) -> Adapter:
        with self._lock:
            self.calls[(tenant, version)] += 1
        if self.delay:
            time.sleep(self.delay)
        return self.adapters[(tenant, version)]


def make_pool(store: Store, slots: int = 2, host_cache_bytes: int = BIG_CACHE) -> AdapterPool:
    return AdapterPool(DIMS, torch.device("cpu"), slots=slots, max_rank=MAX_RANK,
                       host_cache_bytes=host_cache_bytes, fetch=store)


def assert_in_slot(pool: AdapterPool, slot: int, adapter: Adapter) -> None:
    """The slot holds A (rank rows, zero rows after) and B * alpha/rank (zero columns after), and the head."""
    rank = adapter.rank
    for key, (a, b) in adapter.lora.items():
        pool_a, pool_b = pool.lora_a[key][slot], pool.lora_b[key][slot]
        assert pool_a.shape == (MAX_RANK, a.shape[1])
        assert pool_b.shape == (b.shape[0], MAX_RANK)
        assert torch.equal(pool_a[:rank], a)
        assert torch.count_nonzero(pool_a[rank:]) == 0
        torch.testing.assert_close(pool_b[:, :rank], b * adapter.scaling, rtol=0, atol=0)
        assert torch.count_nonzero(pool_b[:, rank:]) == 0
    for key in set(pool.lora_a) - set(adapter.lora):
        assert torch.count_nonzero(pool.lora_a[key][slot]) == 0
        assert torch.count_nonzero(pool.lora_b[key][slot]) == 0
    labels = adapter.head_weight.shape[0]
    assert int(pool.slot_labels[slot]) == labels
    assert torch.equal(pool.head_weight[slot, :labels], adapter.head_weight)
    assert torch.equal(pool.head_bias[slot, :labels], adapter.head_bias)
    assert torch.count_nonzero(pool.head_weight[slot, labels:]) == 0
    assert torch.count_nonzero(pool.head_bias[slot, labels:]) == 0


# ---- loading and hits ------------------------------------------------------------------------

def test_acquire_loads_scaled_zero_padded_adapters_into_slots():
    store = Store()
    small = store.add("a", rank=4)
    full = store.add("b", rank=MAX_RANK, targets=("query", "ffn_in", "ffn_out"))
    pool = make_pool(store)
    lease = pool.acquire([("a", 1), ("b", 1)])
    slot_a, slot_b = lease.slots[("a", 1)], lease.slots[("b", 1)]
    assert slot_a != slot_b
    assert set(pool.lora_a) == {(layer, target) for layer in range(FIRST, DIMS.layers)
                                for target in ("query", "value", "ffn_in", "ffn_out")}
    assert_in_slot(pool, slot_a, small)
    assert_in_slot(pool, slot_b, full)
    assert pool.used_slots() == 2
    lease.release()


def test_first_acquire_misses_then_device_hits():
    store = Store()
    store.add("a")
    pool = make_pool(store)
    first = pool.acquire([("a", 1)])
    assert (pool.stats.misses, pool.stats.device_hits, pool.stats.host_hits) == (1, 0, 0)
    first.release()
    second = pool.acquire([("a", 1)])
    third = pool.acquire([("a", 1)])  # pinned twice at once is fine
    assert second.slots == first.slots == third.slots
    assert (pool.stats.misses, pool.stats.device_hits, pool.stats.host_hits) == (1, 2, 0)
    assert store.calls[("a", 1)] == 1
    second.release()
    third.release()


def test_duplicate_keys_in_a_batch_share_one_slot():
    store = Store()
    store.add("a")
    store.add("b")
    pool = make_pool(store, slots=2)
    lease = pool.acquire([("a", 1), ("b", 1), ("a", 1), ("b", 1)])
    assert len(lease.slots) == 2
    assert store.calls == Counter({("a", 1): 1, ("b", 1): 1})
    lease.release()


def test_host_bytes_counts_cached_adapters():
    store = Store()
    a, b = store.add("a"), store.add("b")
    pool = make_pool(store)
    pool.acquire([("a", 1), ("b", 1)]).release()
    assert pool.host_bytes() == a.nbytes() + b.nbytes()


# ---- eviction --------------------------------------------------------------------------------

def test_lru_eviction_reuses_the_least_recently_used_slot():
    store = Store()
    adapters = {name: store.add(name) for name in "abc"}
    pool = make_pool(store, slots=2)
    lease_a = pool.acquire([("a", 1)])
    lease_b = pool.acquire([("b", 1)])
    slot_a, slot_b = lease_a.slots[("a", 1)], lease_b.slots[("b", 1)]
    lease_a.release()
    lease_b.release()
    pool.acquire([("a", 1)]).release()  # a is now more recent than b
    lease_c = pool.acquire([("c", 1)])
    assert lease_c.slots[("c", 1)] == slot_b  # b was the least recently used
    assert pool.stats.evictions == 1
    assert pool.used_slots() == 2
    assert_in_slot(pool, slot_b, adapters["c"])
    assert_in_slot(pool, slot_a, adapters["a"])  # untouched
    lease_c.release()

    hits = pool.stats.device_hits
    pool.acquire([("a", 1)]).release()
    assert pool.stats.device_hits == hits + 1  # a stayed on the device
    pool.acquire([("b", 1)]).release()
    assert pool.stats.host_hits == 1  # b came back from host memory, not the store
    assert store.calls[("b", 1)] == 1


def test_slot_reuse_by_a_smaller_rank_and_fewer_labels_leaves_no_trace_of_the_larger_one():
    """Loading zeroes only what the slot's last adapter used beyond the new one's rank and labels."""
    store = Store()
    adapters = [store.add("big", rank=8, labels=5), store.add("small", rank=2, labels=2),
                store.add("middle", rank=4, labels=3), store.add("headless", rank=3, labels=0)]
    pool = make_pool(store, slots=1)
    for adapter, tenant in zip(adapters, ["big", "small", "middle", "headless"]):
        lease = pool.acquire([(tenant, 1)])
        assert_in_slot(pool, lease.slots[(tenant, 1)], adapter)
        lease.release()


def test_slot_reuse_clears_targets_the_new_adapter_does_not_have():
    """An evicted adapter's matrices for other projections must not leak into the next tenant."""
    store = Store()
    store.add("wide", targets=("query", "value", "ffn_in", "ffn_out"))
    narrow = store.add("narrow", targets=("key",))
    pool = make_pool(store, slots=1)
    pool.acquire([("wide", 1)]).release()
    lease = pool.acquire([("narrow", 1)])
    assert_in_slot(pool, lease.slots[("narrow", 1)], narrow)  # checks the other targets are zero
    lease.release()


def test_pinned_slots_are_never_evicted():
    store = Store()
    adapters = {name: store.add(name) for name in "abc"}
    pool = make_pool(store, slots=2)
    lease_a = pool.acquire([("a", 1)])
    lease_b = pool.acquire([("b", 1)])
    with pytest.raises(ResourceExhausted, match="pinned"):
        pool.acquire([("c", 1)])
    assert pool.stats.evictions == 0
    assert_in_slot(pool, lease_a.slots[("a", 1)], adapters["a"])
    assert_in_slot(pool, lease_b.slots[("b", 1)], adapters["b"])

    lease_a.release()
    lease_c = pool.acquire([("c", 1)])
    assert lease_c.slots[("c", 1)] == lease_a.slots[("a", 1)]  # only the unpinned slot was taken
    assert_in_slot(pool, lease_b.slots[("b", 1)], adapters["b"])
    lease_b.release()
    lease_c.release()


def test_failed_acquire_unpins_what_it_pinned():
    """A batch that cannot get all its slots must not leave the slots it did get pinned forever."""
    store = Store()
    for name in "abc":
        store.add(name)
    pool = make_pool(store, slots=2)
    lease_a = pool.acquire([("a", 1)])
    with pytest.raises(ResourceExhausted):
        pool.acquire([("b", 1), ("c", 1)])  # b takes the free slot, c finds everything pinned
    lease_c = pool.acquire([("c", 1)])  # b's slot must be evictable again
    assert lease_c.slots[("c", 1)] != lease_a.slots[("a", 1)]
    lease_a.release()
    lease_c.release()


def test_batch_with_more_adapters_than_slots_is_refused_up_front():
    store = Store()
    for name in "abc":
        store.add(name)
    pool = make_pool(store, slots=2)
    with pytest.raises(ResourceExhausted, match="3 adapters but compute has 2"):
        pool.acquire([("a", 1), ("b", 1), ("c", 1)])
    assert sum(store.calls.values()) == 0  # nothing fetched for a batch that cannot run
    assert pool.used_slots() == 0


def test_rank_above_max_rank_is_a_failed_precondition():
    store = Store()
    store.add("big", rank=MAX_RANK + 1)
    ok = store.add("ok")
    pool = make_pool(store)
    for _ in range(2):  # not cached, and no fetch left pending: the second try fails the same way
        with pytest.raises(FailedPrecondition, match="max-rank"):
            pool.acquire([("big", 1)])
    assert store.calls[("big", 1)] == 2
    assert pool.used_slots() == 0
    assert pool.host_bytes() == 0
    lease = pool.acquire([("ok", 1)])
    assert_in_slot(pool, lease.slots[("ok", 1)], ok)
    lease.release()


# ---- versions --------------------------------------------------------------------------------

def test_new_version_replaces_the_old_one():
    store = Store()
    old = store.add("t", 1)
    new = store.add("t", 2, targets=("query", "key"))
    pool = make_pool(store, slots=2)
    pool.acquire([("t", 1)]).release()
    lease = pool.acquire([("t", 2)])
    assert store.calls == Counter({("t", 1): 1, ("t", 2): 1})
    assert pool.stats.misses == 2
    assert_in_slot(pool, lease.slots[("t", 2)], new)
    assert pool.used_slots() == 1  # the old version's slot was given back
    assert pool.host_bytes() == new.nbytes()  # and its host copy dropped
    lease.release()
    assert not torch.equal(old.head_weight, new.head_weight)


def test_new_version_while_old_one_is_pinned_keeps_the_old_slot_intact():
    """A batch in flight keeps computing with the version it started with."""
    store = Store()
    old = store.add("t", 1)
    new = store.add("t", 2)
    pool = make_pool(store, slots=2)
    lease_old = pool.acquire([("t", 1)])
    lease_new = pool.acquire([("t", 2)])
    assert lease_new.slots[("t", 2)] != lease_old.slots[("t", 1)]
    assert_in_slot(pool, lease_old.slots[("t", 1)], old)
    assert_in_slot(pool, lease_new.slots[("t", 2)], new)
    lease_old.release()
    lease_new.release()


# ---- concurrency and leases ------------------------------------------------------------------

def test_concurrent_acquire_of_a_missing_adapter_fetches_once():
    store = Store()
    adapter = store.add("a")
    entered, gate = threading.Event(), threading.Event()

    def slow_fetch(tenant: str, version: int) -> Adapter:
        entered.set()
        assert gate.wait(timeout=10)
        return store(tenant, version)

    pool = AdapterPool(DIMS, torch.device("cpu"), slots=2, max_rank=MAX_RANK, host_cache_bytes=BIG_CACHE,
                       fetch=slow_fetch)
    leases, errors = [], []

    def worker():
        try:
            leases.append(pool.acquire([("a", 1)]))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    assert entered.wait(timeout=10)
    time.sleep(0.2)  # let the other threads reach the pending fetch
    gate.set()
    for thread in threads:
        thread.join(timeout=10)
    assert not errors
    assert len(leases) == 6
    assert store.calls[("a", 1)] == 1
    assert pool.stats.misses == 1
    assert pool.stats.device_hits + pool.stats.host_hits == 5
    assert {lease.slots[("a", 1)] for lease in leases} == {leases[0].slots[("a", 1)]}
    assert_in_slot(pool, leases[0].slots[("a", 1)], adapter)
    for lease in leases:
        lease.release()


def test_lease_release_is_idempotent():
    """Releasing twice must not unpin a slot that another batch still holds."""
    store = Store()
    a = store.add("a")
    store.add("b")
    pool = make_pool(store, slots=1)
    first = pool.acquire([("a", 1)])
    second = pool.acquire([("a", 1)])
    first.release()
    first.release()
    assert first.released
    with pytest.raises(ResourceExhausted):
        pool.acquire([("b", 1)])  # a is still pinned by `second`
    assert_in_slot(pool, second.slots[("a", 1)], a)
    second.release()
    pool.acquire([("b", 1)]).release()
    assert pool.stats.evictions == 1


# ---- host cache ------------------------------------------------------------------------------

def test_host_cache_is_bounded():
    """Adapters that are not on the device are dropped from host memory beyond the budget."""
    store = Store()
    adapters = [store.add(f"t{i}") for i in range(5)]
    size = adapters[0].nbytes()
    pool = make_pool(store, slots=1, host_cache_bytes=2 * size)
    for i in range(5):
        pool.acquire([(f"t{i}", 1)]).release()
    assert pool.host_bytes() <= 2 * size + size  # at most the budget plus the resident one


def test_device_resident_adapter_is_not_fetched_again_with_a_small_host_cache():
    store = Store()
    store.add("a")
    store.add("b")
    pool = make_pool(store, slots=2, host_cache_bytes=1)
    pool.acquire([("a", 1)]).release()
    pool.acquire([("b", 1)]).release()
    pool.acquire([("b", 1)]).release()  # b sits in a device slot
    assert store.calls[("b", 1)] == 1
    assert pool.stats.device_hits == 1


def test_eviction_keeps_a_popular_adapter_through_a_burst_of_one_off_tenants():
    store = Store()
    for name in ["hot"] + [f"once-{i}" for i in range(6)]:
        store.add(name)
    pool = make_pool(store, slots=2)
    for _ in range(5):
        pool.acquire([("hot", 1)]).release()
    for i in range(6):
        pool.acquire([(f"once-{i}", 1)]).release()
    hits = pool.stats.device_hits
    pool.acquire([("hot", 1)]).release()
    assert pool.stats.device_hits == hits + 1, "pure LRU would have evicted the popular adapter"
    assert pool.stats.evictions == 5


def test_head_buffer_grows_for_a_tenant_with_many_labels_and_keeps_the_others():
    store = Store()
    small = store.add("small")
    many = store.add("many", labels=20)
    pool = make_pool(store, slots=2)
    lease = pool.acquire([("small", 1)])
    pool.acquire([("many", 1)]).release()
    assert pool.head_weight.shape[1] == 32
    assert_in_slot(pool, lease.slots[("small", 1)], small)
    assert_in_slot(pool, pool._slot_of[("many", 1)], many)
    lease.release()


def test_prefetch_warms_the_host_cache_without_taking_a_slot():
    fetched = []
    pool = AdapterPool(DIMS, torch.device("cpu"), slots=2, max_rank=4, host_cache_bytes=1 << 20,
                       fetch=lambda t, v: fetched.append(t) or random_adapter(DIMS, num_labels=2, rank=2,
                                                                              first_layer=0, seed=len(fetched)))
    pool.prefetch(("a", 1))
    pool.prefetch(("a", 1))                      # already warm: no second fetch
    assert fetched == ["a"] and pool.used_slots() == 0 and pool.stats.misses == 1
    lease = pool.acquire([("a", 1)])
    assert pool.stats.host_hits == 1 and fetched == ["a"]
    lease.release()


def test_a_batch_of_new_tenants_fetches_them_side_by_side():
    """Three misses in one batch: every fetch waits for the other two, so only concurrent fetches finish."""
    store = Store()
    for tenant in "abc":
        store.add(tenant)
    together = threading.Barrier(3, timeout=10)
    fetch = store.__call__

    def concurrent_fetch(tenant: str, version: int) -> Adapter:
        together.wait()      # raises BrokenBarrierError if the fetches ran one after another
        return fetch(tenant, version)

    pool = AdapterPool(DIMS, torch.device("cpu"), slots=4, max_rank=MAX_RANK, host_cache_bytes=BIG_CACHE,
                       fetch=concurrent_fetch)
    lease = pool.acquire([("a", 1), ("b", 1), ("c", 1), ("a", 1)])
    for tenant in "abc":
        assert_in_slot(pool, lease.slots[(tenant, 1)], store.adapters[(tenant, 1)])
    assert pool.stats.misses == 3 and sum(store.calls.values()) == 3


def test_forgotten_tenants_give_their_memory_back_and_are_fetched_again():
    from hmi_proto.v1 import knowledge_store_pb2 as pb
    from services.compute.adapter_invalidation import AdapterInvalidation
    store = Store()
    store.add("kept")
    store.add("churned")
    pool = make_pool(store, slots=4)
    pool.acquire([("kept", 1), ("churned", 1)]).release()
    before = pool.host_bytes()

    class ChangeLog:      # what the store's ListChanges answers, in order
        replies = [pb.ListChangesResponse(store_id="s", revision=7, complete=True),
                   pb.ListChangesResponse(store_id="s", revision=8, complete=True,
                                          changes=[pb.Change(revision=8, kind="tenant", name="churned")])]

        def changes(self, after, wait=0.0, timeout=10.0):
            return self.replies.pop(0)

    follower = AdapterInvalidation(ChangeLog(), pool)
    assert follower.poll_once() == 0 and follower.revision == 7     # the first poll only learns where the log is
    assert follower.poll_once() == 2 and follower.revision == 8     # host copy and slot of "churned"
    assert pool.host_bytes() < before and pool.used_slots() == 1
    pool.acquire([("kept", 1)]).release()
    assert store.calls[("kept", 1)] == 1                             # the other tenant stays cached
    pool.acquire([("churned", 1)]).release()
    assert store.calls[("churned", 1)] == 2                          # fetched again
