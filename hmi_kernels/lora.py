"""Segmented multi-adapter LoRA over a packed batch (Punica's SGMV idea).

Tokens of one tenant are contiguous (a *segment*); every segment names the device slot of its
adapter. Three implementations that must agree: `sgmv_reference` (a loop over segments, two matmuls
each: the definition, and the CPU path for sentences), `sgmv_grouped` (every segment at once as two
batched matmuls over the segments padded to the longest, so the Python work per projection does not grow
with the tenants in the batch: the CPU path for decode steps) and the CUDA kernels (hmi_kernels/cuda/lora.cu).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

# The CPU path takes the grouped form for many short segments (decode steps: one token per sequence), the loop
# otherwise. Measured on the 2-core CPU in inference mode, per projection (384 wide, rank 8 in 16-slot padding):
# the loop costs ~6 us per segment, the grouped form ~45 us + ~2.6 us per segment for one-token segments
# (32 x 1: 0.23 against 0.12 ms; 64 x 1: 0.47 against 0.22 ms), and is level with the loop or slower from ~15
# tokens per segment (16 x 15: 0.21 against 0.21 ms; 8 x 30: 0.13 against 0.18 ms), where the padding copies and
# small batched matmuls cost what the calls saved (the table is in docs/performance.md).
GROUPED_MIN_SEGMENTS = 8
GROUPED_MAX_MEAN_TOKENS = 4


@dataclass(frozen=True)
class SegmentPlan:
    """The segments with an adapter laid out for batched matmuls: segment i's tokens are rows
    [i * width, i * width + length) of a zero-padded [segments * width] view."""
    slots: torch.Tensor          # int64 [S]: adapter slot per segment
    width: int                   # tokens of the longest segment
    padded_rows: torch.Tensor    # int64 [covered]: row of each covered token in the padded view
    tokens: torch.Tensor | None  # int64 [covered]: the covered tokens; None when they are all tokens, in order


@dataclass(frozen=True)
class Segments:
    """Token ranges [starts[i], ends[i]) that all use adapter slot slots[i]; computed once per batch.

    `device_slots` (int32 per token, on the GPU) is set when the CUDA kernels run the batch (see dispatch.py)."""
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    slots: tuple[int, ...]
    device_slots: torch.Tensor | None = field(default=None, compare=False)

    def within(self, limit: int) -> "Segments":
        """The segments inside the first `limit` tokens (the sequences active at a layer); itself when that is
        all of them (so its grouped plan is built once for every layer)."""
        if not self.ends or limit >= self.ends[-1]:
            return self
        keep = [i for i, start in enumerate(self.starts) if start < limit]
        return Segments(tuple(self.starts[i] for i in keep), tuple(min(self.ends[i], limit) for i in keep),
                        tuple(self.slots[i] for i in keep),
                        None if self.device_slots is None else self.device_slots[:limit])

    def on_device(self, tokens: int, device: torch.device) -> "Segments":
        return Segments(self.starts, self.ends, self.slots, token_slots(self, tokens, device))

    @cached_property
    def plan(self) -> SegmentPlan | None:
        """The grouped layout of the segments that have an adapter (None: none has); built once per batch,
        on the CPU (the grouped path is the CPU path)."""
        kept = [(start, end, slot) for start, end, slot in zip(self.starts, self.ends, self.slots) if slot >= 0]
        if not kept:
            return None
        width = max(end - start for start, end, _ in kept)
        lengths = torch.tensor([end - start for start, end, _ in kept])
        starts = torch.tensor([start for start, _, _ in kept])
        within = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        segment = torch.repeat_interleave(torch.arange(len(kept)), lengths)
        padded_rows = segment * width + within
        covered = starts[segment] + within
        whole = kept[0][0] == 0 and all(a[1] == b[0] for a, b in zip(kept, kept[1:])) and kept[-1][1] == self.ends[-1]
        return SegmentPlan(torch.tensor([slot for _, _, slot in kept]), width, padded_rows, None if whole else covered)

    @property
    def mean_tokens(self) -> float:
        return (self.ends[-1] - self.starts[0]) / len(self.starts) if self.starts else 0.0


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


def sgmv_grouped(out: torch.Tensor, x: torch.Tensor, segments: Segments, lora_a: torch.Tensor,
                 lora_b: torch.Tensor, slot_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The same as sgmv_reference with a fixed number of operations whatever the number of segments: the
    batch's A and B gathered by slot, x padded per segment, one batched shrink and one batched expand.

    `slot_ranks` (int32 per slot, on the CPU) trims the rank to the largest one in the batch: the pool pads
    every slot to --max-rank with zeros, which would otherwise be multiplied too."""
    plan = segments.plan
    if plan is None:
        return out
    rank = lora_a.shape[1]
    if slot_ranks is not None and slot_ranks.device.type == "cpu":
        rank = min(rank, int(slot_ranks.index_select(0, plan.slots).max()))
        if rank <= 0:
            return out
    count, width = len(plan.slots), plan.width
    a = lora_a[:, :rank].index_select(0, plan.slots)                  # [S, r, in]
    b = lora_b[:, :, :rank].index_select(0, plan.slots)               # [S, out, r]
    rows = x if plan.tokens is None else x.index_select(0, plan.tokens)
    padded = rows.new_zeros(count * width, x.shape[1]).index_copy(0, plan.padded_rows, rows)
    shrunk = torch.bmm(padded.view(count, width, -1), a.transpose(1, 2))        # [S, W, r]
    delta = torch.bmm(shrunk, b.transpose(1, 2)).view(count * width, -1).index_select(0, plan.padded_rows)
    if plan.tokens is None:
        return out.add_(delta)
    return out.index_add_(0, plan.tokens, delta)


def sgmv(out: torch.Tensor, x: torch.Tensor, segments: Segments, lora_a: torch.Tensor, lora_b: torch.Tensor,
         slot_ranks: torch.Tensor | None = None) -> torch.Tensor:
    """The CUDA kernels where hmi_kernels/dispatch.py says so (the batch's segments were put on the device), else
    the grouped CPU path for many short segments and the reference loop for longer ones. `slot_ranks` lets the
    kernels and the grouped form skip each slot's zero padding (None: every rank is used)."""
    from hmi_kernels.dispatch import use_cuda_kernels
    if segments.device_slots is not None and use_cuda_kernels(x):
        if slot_ranks is None:
            slot_ranks = torch.full((lora_a.shape[0],), lora_a.shape[1], dtype=torch.int32, device=x.device)
        return sgmv_cuda(out, x.contiguous(), segments.device_slots, slot_ranks, lora_a, lora_b)
    if (x.device.type == "cpu" and len(segments.starts) >= GROUPED_MIN_SEGMENTS
            and segments.mean_tokens <= GROUPED_MAX_MEAN_TOKENS):
        return sgmv_grouped(out, x, segments, lora_a, lora_b, slot_ranks)
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
    from hmi_kernels.runtime import blocks, check_contiguous, launch
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
