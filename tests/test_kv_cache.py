"""The paged KV pool as the decoder's attention sees it: reads and writes through block tables equal whole
per-sequence caches, padding never leaks what a reused unit held, and int8 units round within half a step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dims import ModelDims
from models.kv_cache import ContiguousKV, KVCache, KVPool, PagedKV

LAYERS, HEADS, D, SIZE = 3, 2, 8, 4


@pytest.fixture
def dims(tmp_path) -> ModelDims:
    return ModelDims(family="llama", hidden=HEADS * D * 2, intermediate=64, layers=LAYERS, heads=HEADS * 2,
                     vocab=50, max_positions=64, kv_heads=HEADS, head_dim=D)


def contiguous(first_layers: list[int], capacity: int) -> ContiguousKV:
    return ContiguousKV([KVCache(first, [torch.zeros(HEADS, capacity, D) for _ in range(first, LAYERS)],
                                 [torch.zeros(HEADS, capacity, D) for _ in range(first, LAYERS)])
                         for first in first_layers])


def scattered_units(rng, blocks: list[int], first_layers: list[int], units: int) -> list[list[tuple[int, ...]]]:
    """Every sequence's blocks on distinct units taken in a random order (nothing contiguous)."""
    order = iter(rng.permutation(units).tolist())
    return [[tuple(next(order) for _ in range(first, LAYERS)) for _ in range(n)]
            for n, first in zip(blocks, first_layers)]


def test_paged_reads_and_writes_equal_per_sequence_caches_over_two_steps(dims):
    rng = np.random.default_rng(0)
    first_layers = [0, 0, 1]                     # ordered by entry layer: those active at a layer come first
    pool = KVPool(dims, 64, SIZE, torch.device("cpu"))
    pool.keys.fill_(float("nan"))                 # what a unit held before: must never reach a result
    pool.values.fill_(float("nan"))
    units = scattered_units(rng, [4, 4, 4], first_layers, 64)
    reference = contiguous(first_layers, 16)
    held = [0, 0, 0]
    for new in ([5, 9, 1], [1, 1, 6]):           # a prefill step, then two decoding beside a prefill
        paged = PagedKV(pool, LAYERS, held, first_layers, units, new)
        reference.lengths = list(held)
        bounds = np.concatenate([[0], np.cumsum(new)]).tolist()
        for layer in range(LAYERS):
            active = sum(first <= layer for first in first_layers)
            within = bounds[:active + 1]
            k, v = torch.randn(within[-1], HEADS * D), torch.randn(within[-1], HEADS * D)
            paged.write(layer, k, v, within)
            reference.write(layer, k, v, within)
            lengths = [h + n for h, n in zip(held, new)][:active]
            for j in range(active):
                for got, want in zip(paged.read(layer, j, lengths[j]), reference.read(layer, j, lengths[j])):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
            got_k, got_v = paged.read_padded(layer, list(range(active)), lengths)
            want_k, want_v = reference.read_padded(layer, list(range(active)), lengths)
            for j, length in enumerate(lengths):
                torch.testing.assert_close(got_k[j, :, :length], want_k[j, :, :length], rtol=0, atol=0)
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=0)        # zeros past each length
        held = [h + n for h, n in zip(held, new)]


def test_a_step_without_the_blocks_its_tokens_need_is_refused(dims):
    pool = KVPool(dims, 8, SIZE, torch.device("cpu"))
    with pytest.raises(ValueError, match="blocks missing"):
        PagedKV(pool, LAYERS, [3], [0], [[(0, 1, 2)]], [2])        # positions 3 and 4: two blocks


def test_int8_units_round_within_half_a_step_per_token_and_head(dims):
    pool = KVPool(dims, 8, SIZE, torch.device("cpu"), kv_dtype="int8")
    k, v = torch.randn(6, HEADS, D) * 3, torch.randn(6, HEADS, D)
    units, offsets = torch.tensor([0, 0, 0, 0, 5, 5]), torch.tensor([0, 1, 2, 3, 0, 1])
    pool.put(units, offsets, k, v)
    keys, values = pool.gather(torch.tensor([0, 5]))              # [2, heads, size, d]
    got_k = torch.cat([keys[0].transpose(0, 1), keys[1].transpose(0, 1)[:2]])
    got_v = torch.cat([values[0].transpose(0, 1), values[1].transpose(0, 1)[:2]])
    for got, want in ((got_k, k), (got_v, v)):
        step = want.abs().amax(dim=-1, keepdim=True) / 127
        assert torch.all((got - want).abs() <= step / 2 + 1e-6)
    assert KVPool.unit_bytes(dims, 16, "float32") / KVPool.unit_bytes(dims, 16, "int8") == pytest.approx(
        4 * D / (D + 4))
    with pytest.raises(ValueError, match="dtype"):
        KVPool(dims, 8, SIZE, torch.device("cpu"), kv_dtype="fp8")


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_each_head_moves_its_own_tokens_and_the_host_tier_copies_units_both_ways(dims, kv_dtype):
    from models.kv_cache import HostKV
    pool = KVPool(dims, 6, 4, torch.device("cpu"), kv_dtype)
    generator = torch.Generator().manual_seed(0)
    for tensor in pool.tensors():
        tensor.copy_(torch.randint(-100, 100, tensor.shape, generator=generator).to(tensor.dtype))
    before = [t.clone() for t in pool.tensors()]
    heads = pool.keys.shape[1]
    # head h keeps tokens (unit 0, offset h) and (unit 1, offset 3 - h); they land in unit 5, offsets 0 and 1
    source_units = torch.tensor([[0, 1]] * heads)
    source_offsets = torch.tensor([[h % 4, 3 - h % 4] for h in range(heads)])
    pool.copy_head_tokens((source_units, source_offsets), (torch.tensor([5, 5]), torch.tensor([0, 1])))
    for tensor, old in zip(pool.tensors(), before):
        for h in range(heads):
            assert torch.equal(tensor[5, h, 0], old[0, h, h % 4]) and torch.equal(tensor[5, h, 1], old[1, h, 3 - h % 4])
        assert torch.equal(tensor[:5], old[:5])
    host = HostKV(pool, 3)
    saved = [t[[2, 4]].clone() for t in pool.tensors()]
    host.copy(pool, out=[(2, 0), (4, 2)], into=[])
    for tensor in pool.tensors():
        tensor[[2, 4]] = 0
    host.copy(pool, out=[], into=[(2, 1), (0, 3)])        # host unit 2 -> pool unit 1, host 0 -> pool 3
    for tensor, kept in zip(pool.tensors(), saved):
        assert torch.equal(tensor[3], kept[0]) and torch.equal(tensor[1], kept[1])
