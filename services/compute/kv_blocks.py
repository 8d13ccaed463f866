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

    def __init__(self, units: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if units < 1 or block_tokens < 1:
            raise ValueError("a KV pool needs at least one unit of at least one token")
        self.block_tokens = block_tokens
        self.stats = BlockStats(units=units)
        self._free: list[int] = list(range(units - 1, -1, -1))     # a stack: low units first
        self._cached: dict[bytes, Block] = {}
        self._evictable: OrderedDict[bytes, Block] = OrderedDict()  # refs == 0, least recently used first

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

    def match(self, keys: list[bytes], layers: int) -> list[Block]:
        """The cached blocks of the longest prefix of `keys`, each now held once more by the caller."""
        found: list[Block] = []
        for key in keys:
            block = self._cached.get(key)
            if block is None or len(block.units) != layers:
                break
            if block.refs == 0:
                del self._evictable[key]
                self.stats.units_cached -= len(block.units)
                self.stats.units_used += len(block.units)
            block.refs += 1
            found.append(block)
        return found

    def cached_blocks(self) -> int:
        return len(self._cached)
