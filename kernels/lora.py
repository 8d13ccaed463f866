"""Segmented multi-adapter LoRA over a packed batch (Punica's SGMV idea), PyTorch reference.

Tokens of one tenant are contiguous (a *segment*); every segment names the device slot of its
adapter. The reference is also the CPU path; the CUDA kernels (kernels/cuda/lora.cu) must match it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Segments:
    """Token ranges [starts[i], ends[i]) that all use adapter slot slots[i]; computed once per batch.

    `device_slots` (int32 per token, on the GPU) is set when the CUDA kernels run the batch (kernels/dispatch.py)."""
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    slots: tuple[int, ...]
    device_slots: torch.Tensor | None = field(default=None, compare=False)

    def within(self, limit: int) -> "Segments":
        """The segments inside the first `limit` tokens (the sequences active at a layer)."""
        keep = [i for i, start in enumerate(self.starts) if start < limit]
        return Segments(tuple(self.starts[i] for i in keep), tuple(min(self.ends[i], limit) for i in keep),
                        tuple(self.slots[i] for i in keep),
                        None if self.device_slots is None else self.device_slots[:limit])

    def on_device(self, tokens: int, device: torch.device) -> "Segments":
        return Segments(self.starts, self.ends, self.slots, token_slots(self, tokens, device))


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


def sgmv(out: torch.Tensor, x: torch.Tensor, segments: Segments, lora_a: torch.Tensor, lora_b: torch.Tensor,
         slot_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The CUDA kernels where kernels/dispatch.py says so (the batch's segments were put on the device), else
    the reference. `slot_ranks` lets the kernels skip each slot's zero padding (None: every rank is used)."""
    from kernels.dispatch import use_cuda_kernels
    if segments.device_slots is not None and use_cuda_kernels(x):
        if slot_ranks is None:
            slot_ranks = torch.full((lora_a.shape[0],), lora_a.shape[1], dtype=torch.int32, device=x.device)
        return sgmv_cuda(out, x.contiguous(), segments.device_slots, slot_ranks, lora_a, lora_b)
    return sgmv_reference(out, x, segments, lora_a, lora_b)


def token_slots(segments: Segments, tokens: int, device: torch.device) -> torch.Tensor:
    """Slot of every token (-1 outside any segment), int32 on the device: what the CUDA kernels index by."""
    slots = torch.full((tokens,), -1, dtype=torch.int32)
    for start, end, slot in zip(segments.starts, segments.ends, segments.slots):
        slots[start:end] = slot
    return slots.to(device)


def sgmv_cuda(out: torch.Tensor, x: torch.Tensor, token_slot: torch.Tensor, slot_rank: torch.Tensor,
              lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """The same as sgmv_reference with one shrink and one expand launch for the whole mixed batch.

    token_slot: int32 [tokens]; slot_rank: int32 [slots] (rows of A / columns of B beyond it are skipped)."""
    from kernels.runtime import blocks, check_contiguous, launch
    tokens, in_dim = x.shape
    _, max_rank, _ = lora_a.shape
    out_dim = lora_b.shape[1]
    if tokens == 0:
        return out
    check_contiguous(out=out, x=x, lora_a=lora_a, lora_b=lora_b, token_slot=token_slot, slot_rank=slot_rank)
    tmp = torch.empty(tokens, max_rank, dtype=torch.float32, device=x.device)
    warps = 8
    launch("lora", "lora_shrink", (tokens, blocks(max_rank, warps)), (32, warps),
           x, lora_a, token_slot, slot_rank, tmp, tokens, in_dim, max_rank)
    threads = 128
    launch("lora", "lora_expand", (blocks(out_dim, threads), tokens), (threads,),
           tmp, lora_b, token_slot, slot_rank, out, tokens, out_dim, max_rank)
    return out
