"""Adapter pool: device slots (hot) -> host cache (warm) -> knowledge store (cold).

Device memory for LoRA is preallocated per (layer, target) as [slots, max_rank, in] / [slots, out, max_rank]
tensors, so loading an adapter is a copy into a slot, never an allocation per request. Smaller ranks
are zero-padded (exact: the padding contributes nothing; the CUDA kernels skip it). Slots in use by a
batch in flight are pinned and never evicted; on a miss the least used unpinned slot (recency breaks ties,
use counts halve over time) is reused. On CUDA the host cache holds page-locked copies. A batch reads the
slots through one `SlotTensors` view, taken after its lease pinned them.
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

import torch

from models.adapter_format import Adapter, target_shape
from models.dims import ModelDims
from models.lora import LoRAWeights
from services.common.errors import FailedPrecondition, HMIError, ResourceExhausted

log = logging.getLogger("hmi.compute.pool")
AdapterKey = tuple[str, int]  # (tenant id, adapter version)


@dataclass
class PoolStats:
    device_hits: int = 0
    host_hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass(frozen=True)
class SlotTensors:
    """Every slot's device tensors, as a batch reads them: LoRA per (layer, target) with each slot's rank, and the
    classification heads [slots, max_labels, H] with each slot's label count."""
    lora: LoRAWeights
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    slot_labels: torch.Tensor


@dataclass
class Lease:
    """Slots pinned for one batch; release() unpins them. `failed`: adapters that could not be loaded (the
    tenant was deleted or replaced, ...) when the caller asked to go on without them."""
    slots: dict[AdapterKey, int]
    pool: "AdapterPool"
    released: bool = field(default=False)
    failed: dict[AdapterKey, HMIError] = field(default_factory=dict)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool._unpin(self.slots.values())


class AdapterPool:
    def __init__(self, dims: ModelDims, device: torch.device, *, slots: int, max_rank: int,
                 host_cache_bytes: int, fetch: Callable[[str, int], Adapter], fetch_workers: int = 4) -> None:
        self.dims = dims
        self.device = device
        self.num_slots = slots
        self.max_rank = max_rank
        self.host_cache_bytes = host_cache_bytes
        self.fetch = fetch
        self._fetchers = ThreadPoolExecutor(max_workers=fetch_workers, thread_name_prefix="adapter-fetch")
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._fetching: dict[AdapterKey, threading.Event] = {}
        self._host: OrderedDict[AdapterKey, Adapter] = OrderedDict()
        self._host_bytes = 0
        self._host_version: dict[str, int] = {}   # tenant -> version last fetched (one version per tenant on host)
        self._slot_of: OrderedDict[AdapterKey, int] = OrderedDict()  # LRU order, oldest first
        self._uses: dict[AdapterKey, float] = {}    # acquisitions, halved every `_aging_period` (frequency)
        self._acquisitions = 0
        self._aging_period = 8 * slots
        self._free = list(range(slots - 1, -1, -1))
        self._pins = [0] * slots
        self._targets_in_slot: list[set[tuple[int, str]]] = [set() for _ in range(slots)]
        self._loaded: list[tuple[int, int]] = [(0, 0)] * slots    # rank and labels last loaded into each slot
        self.lora_a: dict[tuple[int, str], torch.Tensor] = {}
        self.lora_b: dict[tuple[int, str], torch.Tensor] = {}
        # Every slot's head in one buffer [slots, max_labels, H] (grown when a tenant has more labels).
        self.head_weight = torch.zeros(slots, 8, dims.hidden, device=device)
        self.head_bias = torch.zeros(slots, 8, device=device)
        self.slot_labels = torch.zeros(slots, dtype=torch.int32, device=device)
        # Rank of the adapter in each slot: the CUDA LoRA kernels skip the zero padding beyond it.
        self.slot_ranks = torch.full((slots,), max_rank, dtype=torch.int32, device=device)

    # ---- public ----------------------------------------------------------------------------

    def slot_tensors(self) -> SlotTensors:
        """The view a batch computes with. LoRA buffers are live (a projection no adapter targeted yet has none);
        the head buffers are those of now (a later growth leaves this batch's unchanged)."""
        return SlotTensors(LoRAWeights(MappingProxyType(self.lora_a), MappingProxyType(self.lora_b), self.slot_ranks),
                           self.head_weight, self.head_bias, self.slot_labels)

    def acquire(self, keys: list[AdapterKey], *, skip_failed: bool = False) -> Lease:
        """Pins a slot for every key, loading what is missing; fetches from the store run unlocked. With
        `skip_failed`, an adapter that fails for its own tenant (HMIError: deleted, replaced, over the rank)
        is left out and reported in `lease.failed`, so only that tenant's sequences fail."""
        unique = list(dict.fromkeys(keys))
        if len(unique) > self.num_slots:
            raise ResourceExhausted(f"a batch needs {len(unique)} adapters but compute has {self.num_slots} "
                                    f"device slots; lower the gateway's --max-batch-tenants")
        slots: dict[AdapterKey, int] = {}
        try:
            with self._lock:  # resident adapters are pinned at once: a device hit needs no host copy
                self._count_uses(unique)
                for key in unique:
                    slot = self._slot_of.get(key)
                    if slot is not None:
                        self._slot_of.move_to_end(key)
                        self._pins[slot] += 1
                        slots[key] = slot
                        self.stats.device_hits += 1
            adapters, failed = self._host_adapters([key for key in unique if key not in slots], skip_failed)
            with self._lock:
                for key, adapter in adapters.items():
                    slots[key] = self._slot_for(key, adapter)
                    self._pins[slots[key]] += 1
        except BaseException:
            self._unpin(slots.values())
            raise
        return Lease(slots, self, failed=failed)

    def _host_adapters(self, keys: list[AdapterKey],
                       skip_failed: bool = False) -> tuple[dict[AdapterKey, Adapter], dict[AdapterKey, HMIError]]:
        """Host copies of the keys; adapters missing on the host are fetched from the store side by side (a batch of
        new tenants waits for the slowest fetch, not for their sum)."""
        with self._lock:
            missing = [key for key in keys if key not in self._host]
        futures = ({key: self._fetchers.submit(contextvars.copy_context().run, self._host_adapter, key)
                    for key in missing} if len(missing) > 1 else {})
        adapters: dict[AdapterKey, Adapter] = {}
        failed: dict[AdapterKey, HMIError] = {}
        try:
            for key in keys:
                try:
                    adapters[key] = futures[key].result() if key in futures else self._host_adapter(key)
                except HMIError as error:
                    if not skip_failed:
                        raise
                    failed[key] = error
            return adapters, failed
        finally:
            for future in futures.values():
                future.cancel()

    def prefetch(self, key: AdapterKey) -> None:
        """Brings a queued request's adapter into the host cache (no slot taken), so its first step is a
        host hit; already resident adapters cost nothing."""
        with self._lock:
            if key in self._slot_of or key in self._host:
                return
        self._host_adapter(key, count_hit=False)

    def _count_uses(self, keys: list[AdapterKey]) -> None:
        for key in keys:
            self._uses[key] = self._uses.get(key, 0.0) + 1.0
        self._acquisitions += 1
        if self._acquisitions % self._aging_period == 0:   # old popularity fades
            self._uses = {k: v / 2 for k, v in self._uses.items() if v >= 0.5 or k in self._slot_of}

    def forget(self, tenant_id: str) -> int:
        """Drops every version of the tenant from the host cache and from unpinned slots (it was replaced or
        deleted: its memory goes back, and the next request fetches what is current). Returns entries dropped."""
        dropped = 0
        with self._lock:
            for key in [k for k in self._host if k[0] == tenant_id]:
                self._host_bytes -= self._host.pop(key).nbytes()
                dropped += 1
            self._host_version.pop(tenant_id, None)
            for key in [k for k in self._slot_of if k[0] == tenant_id]:
                if self._pins[self._slot_of[key]] == 0:
                    self._free.append(self._slot_of.pop(key))
                    self._uses.pop(key, None)
                    dropped += 1
        return dropped

    def used_slots(self) -> int:
        with self._lock:
            return len(self._slot_of)

    def host_bytes(self) -> int:
        with self._lock:
            return self._host_bytes

    # ---- tiers -----------------------------------------------------------------------------

    def _host_adapter(self, key: AdapterKey, count_hit: bool = True) -> Adapter:
        while True:
            with self._lock:
                adapter = self._host.get(key)
                if adapter is not None:
                    self._host.move_to_end(key)
                    self.stats.host_hits += count_hit
                    return adapter
                pending = self._fetching.get(key)
                if pending is None:
                    event = self._fetching[key] = threading.Event()
                    self.stats.misses += 1
                    break
            pending.wait()  # another batch is fetching the same adapter
        try:
            adapter = self.fetch(*key)
            if adapter.rank > self.max_rank:
                raise FailedPrecondition(f"adapter of tenant {key[0]!r} has rank {adapter.rank}, above this compute "
                                         f"service's --max-rank {self.max_rank}")
            if self.device.type == "cuda":
                adapter = pinned(adapter)   # page-locked: copies into slots run asynchronously
            with self._lock:
                self._drop_older_versions(key)
                self._host[key] = adapter
                self._host_bytes += adapter.nbytes()
                self._trim_host()
            return adapter
        finally:
            with self._lock:
                self._fetching.pop(key, None)
            event.set()

    def _drop_older_versions(self, key: AdapterKey) -> None:
        old_version = self._host_version.get(key[0])
        if old_version is not None and old_version != key[1] and (key[0], old_version) in self._host:
            self._host_bytes -= self._host.pop((key[0], old_version)).nbytes()
        self._host_version[key[0]] = key[1]
        for old in [k for k in self._slot_of if k[0] == key[0] and k[1] != key[1]]:
            if self._pins[self._slot_of[old]] == 0:
                self._free.append(self._slot_of.pop(old))

    def _trim_host(self) -> None:
        """Drops the least recently used host copies, never the newest (about to be loaded into a slot)."""
        excess = self._host_bytes - self.host_cache_bytes
        if excess <= 0:
            return
        newest = next(reversed(self._host))
        victims = []
        for key, adapter in self._host.items():   # oldest first; stops as soon as enough is found
            if excess <= 0 or key == newest:
                break
            if key not in self._slot_of:          # a resident adapter stays warm too
                victims.append(key)
                excess -= adapter.nbytes()
        for key in victims:
            self._host_bytes -= self._host.pop(key).nbytes()
            if self._host_version.get(key[0]) == key[1]:
                del self._host_version[key[0]]

    def _slot_for(self, key: AdapterKey, adapter: Adapter) -> int:
        slot = self._slot_of.get(key)
        if slot is not None:
            self._slot_of.move_to_end(key)
            return slot
        if self._free:
            slot = self._free.pop()
        else:
            # Recency and frequency: the least used unpinned adapter, the least recently used among equals, so
            # a burst of one-off tenants cannot flush the popular ones.
            candidates = [k for k, s in self._slot_of.items() if self._pins[s] == 0]
            victim = min(candidates, key=lambda k: self._uses.get(k, 0.0), default=None)
            if victim is None:
                raise ResourceExhausted(f"all {self.num_slots} adapter slots are pinned by batches in flight; retry")
            slot = self._slot_of.pop(victim)
            self.stats.evictions += 1
        self._load(slot, adapter)
        self._slot_of[key] = slot
        return slot

    def _load(self, slot: int, adapter: Adapter) -> None:
        """As few torch calls as it takes (each hands the GIL to the execution threads and back): a slot's rows
        beyond the rank and labels its last adapter used are zero already, so only a shrink zeroes anything."""
        old_rank, old_labels = self._loaded[slot]
        for target_key in self._targets_in_slot[slot] - set(adapter.lora):
            self.lora_a[target_key][slot].zero_()
            self.lora_b[target_key][slot].zero_()
        for target_key, (a, b) in adapter.lora.items():
            pool_a, pool_b = self._buffers(target_key)
            rank = a.shape[0]
            if target_key in self._targets_in_slot[slot] and old_rank > rank:
                pool_a[slot, rank:old_rank].zero_()
                pool_b[slot, :, rank:old_rank].zero_()
            pool_a[slot, :rank].copy_(a, non_blocking=True)
            pool_b[slot, :, :rank].copy_(b, non_blocking=True).mul_(adapter.scaling)
        self._targets_in_slot[slot] = set(adapter.lora)
        rank = max((a.shape[0] for a, _ in adapter.lora.values()), default=0)
        self.slot_ranks[slot] = rank
        labels = adapter.head_weight.shape[0]
        if labels > self.head_weight.shape[1]:
            self._grow_heads(labels)
        if old_labels > labels:
            self.head_weight[slot, labels:old_labels].zero_()
            self.head_bias[slot, labels:old_labels].zero_()
        if labels:
            self.head_weight[slot, :labels].copy_(adapter.head_weight, non_blocking=True)
            self.head_bias[slot, :labels].copy_(adapter.head_bias, non_blocking=True)
        self.slot_labels[slot] = labels
        self._loaded[slot] = (rank, labels)

    def _grow_heads(self, labels: int) -> None:
        """A new, larger head buffer (a batch in flight keeps reading the old one, which stays valid)."""
        size = 1 << (labels - 1).bit_length()
        weight = torch.zeros(self.num_slots, size, self.dims.hidden, device=self.device)
        bias = torch.zeros(self.num_slots, size, device=self.device)
        weight[:, :self.head_weight.shape[1]] = self.head_weight
        bias[:, :self.head_bias.shape[1]] = self.head_bias
        self.head_weight, self.head_bias = weight, bias
        log.info("head buffer grown to %d labels per slot", size)

    def _buffers(self, target_key: tuple[int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        if target_key not in self.lora_a:
            fan_in, fan_out = target_shape(target_key[1], self.dims)
            self.lora_a[target_key] = torch.zeros(self.num_slots, self.max_rank, fan_in, device=self.device)
            self.lora_b[target_key] = torch.zeros(self.num_slots, fan_out, self.max_rank, device=self.device)
            log.info("allocated LoRA slots for layer %d %s: %d slots x rank %d", *target_key, self.num_slots,
                     self.max_rank)
        return self.lora_a[target_key], self.lora_b[target_key]

    def _unpin(self, slots) -> None:
        with self._lock:
            for slot in slots:
                self._pins[slot] -= 1


def pinned(adapter: Adapter) -> Adapter:
    """The adapter with every tensor in page-locked host memory (only where CUDA is present)."""
    return dataclasses.replace(
        adapter, lora={key: (a.pin_memory(), b.pin_memory()) for key, (a, b) in adapter.lora.items()},
        head_weight=adapter.head_weight.pin_memory(), head_bias=adapter.head_bias.pin_memory())
