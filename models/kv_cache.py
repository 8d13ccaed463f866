"""Where a decoder step keeps and finds each sequence's keys and values.

The decoder's attention (models/decoder.py) sees one step's sequences through a `StepKV`: how many tokens each
already holds, a write of the step's new keys and values, and reads of one sequence's (prefill) or of many
padded together (decode). Two kinds:

- `PagedKV`, what serving uses: one pool of fixed-size units per compute (`KVPool`, [units, kv_heads,
  block_tokens, head_dim] for keys and again for values); a sequence's block table names the unit of each
  of its blocks at each layer (the accounting is services/compute/kv_blocks.py). New keys of all sequences
  are written in one indexed store per layer; a decode step gathers every sequence's blocks in one index.
  The pool holds fp32, or int8 with a scale per token and head (`KV_DTYPES`: 3.8x less memory at head_dim
  64; keys and values are rounded as they are written, so prefill attends to the rounded values too).
- `ContiguousKV`, for training and references: one preallocated tensor per sequence and layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from models.dims import ModelDims


class StepKV(Protocol):
    lengths: list[int]      # tokens each sequence of the step holds before it (execution order)
    starts: list[int]       # the position of each one's first new token (more than `lengths` under a KV budget)
    tracking: bool          # whether some sequence accumulates the attention its keys receive (`observe`)

    def observe(self, layer: int, members: list[int], weights: torch.Tensor) -> None: ...   # [S, kv_heads, width]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> None: ...

    def read(self, layer: int, j: int, length: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def read_padded(self, layer: int, members: list[int], lengths: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]: ...


KV_DTYPES = ("float32", "int8")


def cache_bytes_per_token(dims: ModelDims, layers: int, dtype: torch.dtype = torch.float32) -> int:
    """KV-cache bytes one token takes over `layers` layers (keys and values)."""
    return 2 * layers * dims.kv_heads * dims.head_dim * torch.empty(0, dtype=dtype).element_size()


class KVPool:
    """Every unit of a compute's KV memory, allocated once (the pages are touched as units are first used).
    `kv_dtype` "int8" keeps each token's keys and values of each head as int8 with one fp32 scale (absolute
    maximum / 127, rounded to nearest): what is read back is within half a step of what was written."""

    def __init__(self, dims: ModelDims, units: int, block_tokens: int, device: torch.device,
                 kv_dtype: str = "float32") -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}")
        self.quantized = kv_dtype == "int8"
        shape = (units, dims.kv_heads, block_tokens, dims.head_dim)
        dtype = torch.int8 if self.quantized else torch.float32
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        if self.quantized:
            self.key_scales = torch.empty(shape[:3], device=device)
            self.value_scales = torch.empty(shape[:3], device=device)
        self.block_tokens = block_tokens

    @staticmethod
    def unit_bytes(dims: ModelDims, block_tokens: int, kv_dtype: str = "float32") -> int:
        if kv_dtype == "int8":
            return block_tokens * 2 * dims.kv_heads * (dims.head_dim + 4)
        return block_tokens * cache_bytes_per_token(dims, 1)

    @property
    def units(self) -> int:
        return self.keys.shape[0]

    def put(self, units: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Token i's keys and values ([count, kv_heads, head_dim]) into unit units[i] at offsets[i]."""
        if not self.quantized:
            self.keys[units, :, offsets] = k
            self.values[units, :, offsets] = v
            return
        for pool, scales, x in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0                       # [count, kv_heads]
            pool[units, :, offsets] = torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8)
            scales[units, :, offsets] = scale

    def tensors(self) -> list[torch.Tensor]:
        """Everything a unit holds, unit first: keys and values (int8: and their scales)."""
        return [self.keys, self.values] + ([self.key_scales, self.value_scales] if self.quantized else [])

    def copy_head_tokens(self, source: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]
                         ) -> None:
        """Moves tokens' stored keys and values (int8: with their scales, unchanged), each key/value head its
        own tokens: from source units and offsets [kv_heads, count] to target units and offsets [count] (the
        same slots for every head)."""
        (su, so), (tu, to) = source, target
        heads = torch.arange(su.shape[0], device=su.device)[:, None]
        for tensor in self.tensors():
            tensor[tu[None, :], heads, to[None, :]] = tensor[su, heads, so]

    def gather(self, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The units' keys and values in fp32: units.shape + [kv_heads, block_tokens, head_dim]."""
        if not self.quantized:
            return self.keys[units], self.values[units]
        return (self.keys[units].float() * self.key_scales[units][..., None],
                self.values[units].float() * self.value_scales[units][..., None])


class HostKV:
    """The host tier's units (services/compute/kv_blocks.py): the pool's layout in host memory (pinned when
    the pool is on a GPU). The copies go through temporaries and wait for each other: correct, not yet
    overlapped with the step."""

    def __init__(self, pool: KVPool, units: int) -> None:
        pinned = pool.keys.is_cuda
        self.tensors = [torch.empty((units,) + tuple(t.shape[1:]), dtype=t.dtype, pin_memory=pinned)
                        for t in pool.tensors()]

    def copy(self, pool: KVPool, out: list[tuple[int, int]], into: list[tuple[int, int]]) -> None:
        """Pool units to host units (`out`: (pool, host) pairs), then host units back into the pool (`into`:
        (host, pool) pairs), each direction one indexed copy per tensor."""
        device = pool.keys.device
        if out:
            source = torch.tensor([u for u, _ in out], device=device)
            target = torch.tensor([h for _, h in out])
            for on_pool, on_host in zip(pool.tensors(), self.tensors):
                on_host[target] = on_pool[source].to("cpu")
        if into:
            source = torch.tensor([h for h, _ in into])
            target = torch.tensor([u for _, u in into], device=device)
            for on_pool, on_host in zip(pool.tensors(), self.tensors):
                on_pool[target] = on_host[source].to(device, non_blocking=True)


class PagedKV:
    """One step's view of the pool: its sequences' held lengths and block tables."""

    def __init__(self, pool: KVPool, layers: int, lengths: list[int], first_layers: list[int],
                 units: Sequence[Sequence[Sequence[int]]], new_tokens: list[int], starts: list[int] | None = None,
                 scores: list[torch.Tensor | None] | None = None) -> None:
        """`units[j][b]`: the units of sequence j's block b, one per layer from `first_layers[j]` up;
        `new_tokens[j]`: how many it feeds this step (their blocks must be in `units`); `starts[j]`: the
        position of its first new token (default: `lengths[j]`); `scores[j]`: [layers, >= held tokens], the
        attention each held key received so far, accumulated here (None: not tracked)."""
        self.pool = pool
        self.lengths = list(lengths)
        self.starts = list(starts) if starts is not None else list(lengths)
        self.scores = scores or [None] * len(lengths)
        self.tracking = any(score is not None for score in self.scores)
        self._new = list(new_tokens)
        size = pool.block_tokens
        widest = max((len(u) for u in units), default=0)
        table = np.zeros((len(units), layers, max(widest, 1)), dtype=np.int64)
        for j, blocks in enumerate(units):
            if blocks:
                table[j, first_layers[j]:, :len(blocks)] = np.asarray(blocks, dtype=np.int64).T
        needed = [-(-(past + n) // size) for past, n in zip(lengths, new_tokens)]
        short = [j for j, (have, need) in enumerate(zip(units, needed)) if len(have) < need]
        if short:
            raise ValueError(f"KV blocks missing for sequences {short}: a step must be given their blocks first")
        self.table = torch.from_numpy(table).to(pool.keys.device)
        positions = np.concatenate([np.arange(past, past + n) for past, n in zip(lengths, new_tokens)] or
                                   [np.zeros(0, dtype=np.int64)])
        owners = np.repeat(np.arange(len(units)), new_tokens)
        self._owner = torch.from_numpy(owners).to(pool.keys.device)
        self._block = torch.from_numpy(positions // size).to(pool.keys.device)
        self._offset = torch.from_numpy(positions % size).to(pool.keys.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> None:
        count = bounds[-1]      # the step's first sequences are the ones active at this layer (a prefix)
        units = self.table[self._owner[:count], layer, self._block[:count]]
        heads, d = self.pool.keys.shape[1], self.pool.keys.shape[3]
        self.pool.put(units, self._offset[:count], k[:count].view(count, heads, d), v[:count].view(count, heads, d))

    def observe(self, layer: int, members: list[int], weights: torch.Tensor) -> None:
        """weights[i]: [kv_heads, width] the attention each held key of sequence members[i] received at this
        layer this step from each key/value head's query heads (summed over them and the new queries), padded
        past its length."""
        for i, j in enumerate(members):
            if self.scores[j] is not None:
                held = self.lengths[j] + self._new[j]
                self.scores[j][layer, :, :held] += weights[i, :, :held]

    def read(self, layer: int, j: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = -(-length // self.pool.block_tokens)
        units = self.table[j, layer, :blocks]
        heads, d = self.pool.keys.shape[1], self.pool.keys.shape[3]
        keys, values = self.pool.gather(units)                                        # [blocks, heads, size, d]
        return (keys.transpose(0, 1).reshape(heads, -1, d)[:, :length],
                values.transpose(0, 1).reshape(heads, -1, d)[:, :length])

    def read_padded(self, layer: int, members: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """[len(members), kv_heads, width, head_dim]; positions past a sequence's length are zero in the
        values (their keys are masked by the caller), whatever the pool held there."""
        width = max(lengths)
        blocks = -(-width // self.pool.block_tokens)
        rows = torch.tensor(members, device=self.table.device)
        units = self.table[rows, layer, :blocks]                                     # [S, blocks]
        heads, d = self.pool.keys.shape[1], self.pool.keys.shape[3]
        count = len(members)
        keys, values = (t.permute(0, 2, 1, 3, 4).reshape(count, heads, -1, d)[:, :, :width]
                        for t in self.pool.gather(units))
        padding = torch.arange(width, device=keys.device)[None, :] >= torch.tensor(lengths, device=keys.device)[:, None]
        return keys, values.masked_fill(padding[:, None, :, None], 0.0)


@dataclass
class KVCache:
    """Keys and values of one sequence for the layers it runs, [kv_heads, capacity, head_dim] each,
    preallocated for its whole length."""
    first_layer: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


class ContiguousKV:
    """Each sequence in its own `KVCache` (training runs whole sequences through this; gradients flow)."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches
        self.lengths = [cache.length for cache in caches]
        self.starts = self.lengths
        self.tracking = False

    def observe(self, layer: int, members: list[int], weights: torch.Tensor) -> None:
        pass

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> None:
        for j in range(len(bounds) - 1):
            cache, start, end = self.caches[j], bounds[j], bounds[j + 1]
            n, past = end - start, self.lengths[j]
            if past + n > cache.capacity:
                raise ValueError(f"KV cache overflow: {past + n} tokens > capacity {cache.capacity}")
            slot = layer - cache.first_layer
            heads, d = cache.keys[slot].shape[0], cache.keys[slot].shape[2]
            cache.keys[slot][:, past:past + n] = k[start:end].view(n, heads, d).transpose(0, 1)
            cache.values[slot][:, past:past + n] = v[start:end].view(n, heads, d).transpose(0, 1)

    def read(self, layer: int, j: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.caches[j]
        slot = layer - cache.first_layer
        return cache.keys[slot][:, :length], cache.values[slot][:, :length]

    def read_padded(self, layer: int, members: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.caches[members[0]].keys[layer - self.caches[members[0]].first_layer]
        heads, d = first.shape[0], first.shape[2]
        keys = first.new_zeros(len(members), heads, max(lengths), d)
        values = first.new_zeros(len(members), heads, max(lengths), d)
        for i, j in enumerate(members):
            k, v = self.read(layer, j, lengths[i])
            keys[i, :, :lengths[i]], values[i, :, :lengths[i]] = k, v
        return keys, values

    def advance(self, counts: list[int]) -> None:
        for cache, n in zip(self.caches, counts):
            cache.length += n
