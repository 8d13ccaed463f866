"""Segmented multi-adapter LoRA over a packed batch (Punica's SGMV idea), PyTorch reference.

Tokens of one tenant are contiguous (a *segment*); every segment names the device slot of its
adapter. The reference is also the CPU path; CUDA kernels (issue 4) must match it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segments:
    """Token ranges [starts[i], ends[i]) that all use adapter slot slots[i]; computed once per batch."""
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    slots: tuple[int, ...]

    def within(self, limit: int) -> "Segments":
        """The segments inside the first `limit` tokens (the sequences active at a layer)."""
        keep = [i for i, start in enumerate(self.starts) if start < limit]
        return Segments(tuple(self.starts[i] for i in keep), tuple(min(self.ends[i], limit) for i in keep),
                        tuple(self.slots[i] for i in keep))


def find_segments(slot_per_token: list[int], boundaries: list[int]) -> Segments:
    """Merges consecutive sequences (given by boundaries, n+1 offsets) that share a slot."""
    starts, ends, slots = [], [], []
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        slot = slot_per_token[start]
        if slots and slots[-1] == slot and ends[-1] == start:
            ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
            slots.append(slot)
    return Segments(tuple(starts), tuple(ends), tuple(slots))


def sgmv_reference(out: torch.Tensor, x: torch.Tensor, segments: Segments, lora_a: torch.Tensor,
                   lora_b: torch.Tensor) -> torch.Tensor:
    """out[s:e] += (x[s:e] @ A[slot]^T) @ B[slot]^T for every segment, in place.

    lora_a: [slots, rank, in]; lora_b: [slots, out, rank], already multiplied by alpha / rank.
    A slot whose adapter does not target this projection holds zeros, so the result is unchanged.
    """
    for start, end, slot in zip(segments.starts, segments.ends, segments.slots):
        if slot < 0:
            continue
        shrunk = x[start:end] @ lora_a[slot].T
        out[start:end].addmm_(shrunk, lora_b[slot].T)
    return out
