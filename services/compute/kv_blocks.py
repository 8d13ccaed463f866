"""Paged KV accounting for generation, without tensors: which pool units hold which sequence's keys and
values, and which full blocks are kept for reuse as a prefix cache.

- A *unit* is one layer's keys and values of `block_tokens` consecutive tokens (the tensor side,
  models/kv_cache.py, holds one pool of units per compute). A *block* is the units of one span of
  `block_tokens` tokens over every layer a sequence runs (its split layer up to the last), so a sequence
  entering at a higher split layer takes fewer units per block: memory is counted as it is used.
- Blocks are allocated as tokens arrive. A full block can be *registered* under a key that chains every
  token before and in it to a root naming the model, tenant, adapter version, domain, domain revision and
  split layer (`PrefixKeys`): a later sequence whose tokens and root are the same reuses the block instead
  of computing it. Keys are BLAKE2b digests, so two tenants, or two versions of one adapter, can only share
  a block if the hash collides.
- Registered blocks no sequence holds stay cached, least recently used first out, until their units are
  needed; unregistered blocks go back to the free list when their sequence ends.
- A *host tier* (optional, `host_units` > 0): a cached block given up for room is not dropped but copied to
  host memory (device -> host on a GPU), kept there least recently used first out, and copied back into the
  pool when a later sequence's prefix names it: a finished conversation's or a preempted sequence's full
  blocks outlive the pool's churn. The copies are planned here as unit numbers (`take_copies`) and made by
  the step runner before the step's forward pass: all copies out, then all copies in. A host slot freed by
  a copy in is reused only from the next plan on, so a copy out never overwrites what a copy in of the same
  plan still reads.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 16


@dataclass(eq=False)
class Block:
    units: tuple[int, ...]          # one per layer the sequence runs, lowest layer first
    key: bytes | None = None        # set once registered in the prefix cache
    refs: int = 1


@dataclass
class BlockStats:
    units: int = 0                  # in the pool
    units_used: int = 0             # held by running sequences
    units_cached: int = 0           # kept in the prefix cache, held by nobody (evictable)
    prefix_queries: int = 0         # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0            # of them found (their prefill was skipped)
    evictions: int = 0              # cached blocks given up for room
    host_units: int = 0             # in the host tier
    host_units_cached: int = 0      # holding blocks given up by the pool
    swapped_out: int = 0            # blocks copied to the host tier
    swapped_in: int = 0             # blocks copied back from it (prefix hits the pool alone had lost)
    host_evictions: int = 0         # host-tier blocks dropped for room


@dataclass
class Copies:
    """The pool <-> host copies a step makes before its forward pass: out (pool unit, host unit) first, then
    in (host unit, pool unit)."""
    out: list[tuple[int, int]]
    into: list[tuple[int, int]]

    def __bool__(self) -> bool:
        return bool(self.out or self.into)


class PrefixKeys:
    """The chain of keys of a sequence's full blocks: key i covers tokens [0, (i + 1) * block_tokens)."""

    def __init__(self, root: tuple, block_tokens: int = BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        self._root = hashlib.blake2b(repr(root).encode(), digest_size=16).digest()
        self.keys: list[bytes] = []

    def extend(self, tokens: list[int], full_blocks: int) -> list[bytes]:
        """Keys of the first `full_blocks` blocks of `tokens` (computed once each)."""
        size = self.block_tokens
        while len(self.keys) < full_blocks:
            i = len(self.keys)
            chunk = np.asarray(tokens[i * size:(i + 1) * size], dtype=np.int64).tobytes()
            self.keys.append(hashlib.blake2b(chunk, digest_size=16, key=self.keys[-1] if self.keys else self._root
                                             ).digest())
        return self.keys[:full_blocks]


class BlockManager:
    """Not thread-safe: the generation scheduler calls it under its own lock."""

    def __init__(self, units: int, block_tokens: int = BLOCK_TOKENS, host_units: int = 0) -> None:
        if units < 1 or block_tokens < 1 or host_units < 0:
            raise ValueError("a KV pool needs at least one unit of at least one token (and a host tier >= 0 units)")
        self.block_tokens = block_tokens
        self.stats = BlockStats(units=units, host_units=host_units)
        self._free: list[int] = list(range(units - 1, -1, -1))     # a stack: low units first
        self._cached: dict[bytes, Block] = {}
        self._evictable: OrderedDict[bytes, Block] = OrderedDict()  # refs == 0, least recently used first
        self._host_free: list[int] = list(range(host_units - 1, -1, -1))
        self._host: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()   # key -> host units, LRU first
        self._host_released: list[int] = []      # freed by a planned copy in: reusable from the next plan
        self._copies = Copies([], [])
        self._incoming: set[int] = set()         # pool units a planned copy in still has to fill
        self._outgoing: set[int] = set()         # host units a planned copy out still has to fill
        self._planned_out = 0                    # of them, held by blocks still in the host tier

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def available(self) -> int:
        """Units an allocation can take: free ones and those of cached blocks nobody holds."""
        return len(self._free) + self.stats.units_cached

    def allocate(self, layers: int) -> Block | None:
        """A block of `layers` units, evicting cached blocks as needed; None when the pool cannot give them."""
        if self.available() < layers:
            return None
        while len(self._free) < layers:
            key, victim = self._evictable.popitem(last=False)
            del self._cached[key]
            self.stats.units_cached -= len(victim.units)
            self.stats.evictions += 1
            self._to_host(key, victim.units)
            self._free.extend(victim.units)
        units = tuple(self._free.pop() for _ in range(layers))
        self.stats.units_used += layers
        return Block(units)

    def release(self, block: Block) -> None:
        """A sequence lets go of a block: a registered one stays cached once nobody holds it."""
        block.refs -= 1
        if block.refs > 0:
            return
        self.stats.units_used -= len(block.units)
        if block.key is not None and self._cached.get(block.key) is block:
            self._evictable[block.key] = block
            self.stats.units_cached += len(block.units)
        else:
            self._free.extend(block.units)

    def register(self, block: Block, key: bytes) -> None:
        """Keeps a full block for reuse under `key` (a block computed twice side by side is kept once)."""
        if block.key is None and key not in self._cached:
            block.key = key
            self._cached[key] = block
            self._drop_host(key)     # computed again: the pool's copy is the one kept

    def match(self, keys: list[bytes], layers: int) -> list[Block]:
        """The cached blocks of the longest prefix of `keys`, each now held once more by the caller."""
        found: list[Block] = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                block = self._from_host(key, layers)      # allocated: already held once
                if block is None:
                    break
            elif len(block.units) != layers:
                break
            else:
                if block.refs == 0:
                    del self._evictable[key]
                    self.stats.units_cached -= len(block.units)
                    self.stats.units_used += len(block.units)
                block.refs += 1
            found.append(block)
        return found

    def take_copies(self) -> Copies:
        """The copies planned since the last call, for the step about to run; host units they freed become
        reusable."""
        copies, self._copies = self._copies, Copies([], [])
        self._incoming.clear()
        self._outgoing.clear()
        self._planned_out = 0
        self._host_free.extend(self._host_released)
        self._host_released.clear()
        return copies

    def _to_host(self, key: bytes, units: tuple[int, ...]) -> None:
        """A block the pool gives up goes to the host tier (if it has one and the block's data is there to
        copy: a block whose copy in is still only planned is dropped)."""
        if not self.stats.host_units or len(units) > self.stats.host_units or self._incoming.intersection(units):
            return
        # Room: free host units, and those of older blocks it may drop. A block copied out in this same plan
        # holds units that plan still writes: dropping it frees them only from the next plan on.
        droppable = self.stats.host_units_cached - self._planned_out
        if len(self._host_free) + droppable < len(units):
            return           # the rest of the host tier waits for this plan's copies
        while len(self._host_free) < len(units):
            _key, dropped = self._host.popitem(last=False)
            (self._host_released if self._forget_host(dropped) else self._host_free).extend(dropped)
            self.stats.host_evictions += 1
        slots = tuple(self._host_free.pop() for _ in units)
        self._outgoing.update(slots)
        self._planned_out += len(slots)
        self._copies.out.extend(zip(units, slots))
        self._host[key] = slots
        self.stats.host_units_cached += len(slots)
        self.stats.swapped_out += 1

    def _from_host(self, key: bytes, layers: int) -> Block | None:
        """The host tier's copy of `key` back in the pool (new units, held once, registered), or None."""
        slots = self._host.get(key)
        if slots is None or len(slots) != layers:
            return None
        del self._host[key]           # before allocating: its eviction must not pick these slots
        block = self.allocate(layers)
        if block is None:
            self._host[key] = slots
            return None
        self._forget_host(slots)
        self._host_released.extend(slots)
        self._copies.into.extend(zip(slots, block.units))
        self._incoming.update(block.units)
        block.key = key
        self._cached[key] = block
        self.stats.swapped_in += 1
        return block

    def _drop_host(self, key: bytes) -> None:
        slots = self._host.pop(key, None)
        if slots is not None:
            self._forget_host(slots)
            self._host_released.extend(slots)

    def _forget_host(self, slots: tuple[int, ...]) -> bool:
        """The accounting of a block leaving the host tier; True when this plan still copies into its units."""
        self.stats.host_units_cached -= len(slots)
        pending = not self._outgoing.isdisjoint(slots)
        if pending:
            self._planned_out -= len(slots)
        return pending

    def cached_blocks(self) -> int:
        return len(self._cached)
