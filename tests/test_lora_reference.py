"""Segmented multi-adapter LoRA (PyTorch reference, also the CPU path): segments are formed
correctly from packed sequences, and sgmv_reference equals the obvious per-token computation."""
from __future__ import annotations

import pytest
import torch

from hmi_kernels.lora import Segments, find_segments, sgmv_reference


def per_token(slots_per_sequence: list[int], boundaries: list[int]) -> list[int]:
    slots = []
    for slot, start, end in zip(slots_per_sequence, boundaries[:-1], boundaries[1:]):
        slots += [slot] * (end - start)
    return slots


# ---- find_segments ---------------------------------------------------------------------------

def test_find_segments_merges_consecutive_sequences_with_the_same_slot():
    boundaries = [0, 3, 5, 9, 10, 12]
    segments = find_segments(per_token([2, 2, 0, 0, 0], boundaries), boundaries)
    assert segments == Segments(starts=(0, 5), ends=(5, 12), slots=(2, 0))


def test_find_segments_splits_different_slots():
    boundaries = [0, 1, 4, 6]
    segments = find_segments(per_token([1, 0, 1], boundaries), boundaries)
    assert segments == Segments(starts=(0, 1, 4), ends=(1, 4, 6), slots=(1, 0, 1))


def test_find_segments_single_sequence_and_no_adapter_slot():
    assert find_segments([-1] * 4, [0, 4]) == Segments((0,), (4,), (-1,))
    boundaries = [0, 2, 3, 5]
    assert find_segments(per_token([-1, -1, 3], boundaries), boundaries) == Segments((0, 3), (3, 5), (-1, 3))


def test_find_segments_covers_every_token_exactly_once():
    """Segments tile [0, tokens) in order, and every token's slot is its segment's slot."""
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 6, (30,), generator=generator).tolist()
    boundaries = [0]
    for length in lengths:
        boundaries.append(boundaries[-1] + length)
    slots = per_token(torch.randint(-1, 3, (30,), generator=generator).tolist(), boundaries)
    segments = find_segments(slots, boundaries)
    assert segments.starts[0] == 0 and segments.ends[-1] == boundaries[-1]
    assert list(segments.starts[1:]) == list(segments.ends[:-1])
    assert all(a != b for a, b in zip(segments.slots, segments.slots[1:]))  # maximal merging
    for start, end, slot in zip(segments.starts, segments.ends, segments.slots):
        assert slots[start:end] == [slot] * (end - start)


# ---- Segments.within -------------------------------------------------------------------------

SEGMENTS = Segments(starts=(0, 4, 7), ends=(4, 7, 12), slots=(5, 6, 7))


@pytest.mark.parametrize("limit, expected", [
    (12, SEGMENTS),
    (100, SEGMENTS),
    (7, Segments((0, 4), (4, 7), (5, 6))),
    (8, Segments((0, 4, 7), (4, 7, 8), (5, 6, 7))),
    (5, Segments((0, 4), (4, 5), (5, 6))),
    (4, Segments((0,), (4,), (5,))),
    (1, Segments((0,), (1,), (5,))),
    (0, Segments((), (), ())),
])
def test_within_truncates_to_the_first_tokens(limit, expected):
    assert SEGMENTS.within(limit) == expected


# ---- sgmv_reference --------------------------------------------------------------------------

def naive(out: torch.Tensor, x: torch.Tensor, slot_per_token: list[int], lora_a: torch.Tensor,
          lora_b: torch.Tensor) -> torch.Tensor:
    """y[t] += B[slot_t] @ (A[slot_t] @ x[t]) for every token with an adapter."""
    result = out.clone()
    for t, slot in enumerate(slot_per_token):
        if slot >= 0:
            result[t] += lora_b[slot] @ (lora_a[slot] @ x[t])
    return result


@pytest.mark.parametrize("seed, n_in, n_out, rank, slots", [
    (0, 16, 16, 4, 3), (1, 32, 64, 8, 5), (2, 64, 24, 1, 2), (3, 8, 8, 16, 4),
])
def test_sgmv_reference_matches_per_token_loop(seed, n_in, n_out, rank, slots):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (12,), generator=generator).tolist()
    boundaries = [0]
    for length in lengths:
        boundaries.append(boundaries[-1] + length)
    tokens = boundaries[-1]
    sequence_slots = torch.randint(-1, slots, (12,), generator=generator).tolist()
    sequence_slots[0], sequence_slots[1] = -1, 0  # at least one no-adapter and one adapter segment
    slot_per_token = per_token(sequence_slots, boundaries)
    segments = find_segments(slot_per_token, boundaries)
    assert len(segments.slots) >= 2

    x = torch.randn(tokens, n_in, generator=generator, dtype=torch.float64)
    out = torch.randn(tokens, n_out, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(slots, rank, n_in, generator=generator, dtype=torch.float64)
    lora_b = torch.randn(slots, n_out, rank, generator=generator, dtype=torch.float64)
    before = out.clone()
    expected = naive(before, x, slot_per_token, lora_a, lora_b)

    result = sgmv_reference(out, x, segments, lora_a, lora_b)
    assert result is out  # in place
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    unchanged = torch.tensor([slot < 0 for slot in slot_per_token])
    changed = ~unchanged
    assert torch.equal(out[unchanged], before[unchanged])  # slot -1: exactly untouched
    assert not torch.allclose(out[changed], before[changed])  # the others really got a delta


def test_sgmv_reference_float32_and_zero_slot_is_a_no_op():
    """A zero slot (adapter not targeting this projection) leaves its tokens unchanged."""
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(6, 8, generator=generator)
    out = torch.randn(6, 8, generator=generator)
    lora_a = torch.randn(2, 4, 8, generator=generator)
    lora_b = torch.randn(2, 8, 4, generator=generator)
    lora_a[1].zero_()
    lora_b[1].zero_()
    before = out.clone()
    segments = find_segments([0, 0, 1, 1, 1, 0], [0, 2, 5, 6])
    sgmv_reference(out, x, segments, lora_a, lora_b)
    torch.testing.assert_close(out, naive(before, x, [0, 0, 1, 1, 1, 0], lora_a, lora_b))
    assert torch.equal(out[2:5], before[2:5])


def test_sgmv_reference_with_within_only_touches_active_tokens():
    """Using segments.within(limit), tokens past the limit are never written."""
    generator = torch.Generator().manual_seed(4)
    boundaries = [0, 3, 6, 10]
    slot_per_token = per_token([0, 1, 0], boundaries)
    x = torch.randn(10, 8, generator=generator, dtype=torch.float64)
    out = torch.randn(10, 8, generator=generator, dtype=torch.float64)
    lora_a = torch.randn(2, 2, 8, generator=generator, dtype=torch.float64)
    lora_b = torch.randn(2, 8, 2, generator=generator, dtype=torch.float64)
    before = out.clone()
    sgmv_reference(out, x, find_segments(slot_per_token, boundaries).within(5), lora_a, lora_b)
    expected = naive(before, x, slot_per_token[:5] + [-1] * 5, lora_a, lora_b)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[5:], before[5:])
