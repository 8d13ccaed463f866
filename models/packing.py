"""The packed inputs of the upper layers: one builder for classification batches and generation steps.

A batch mixes tenants and entry layers. Its sequences run in the order of (entry layer, adapter slot), so
the sequences active at a layer are a prefix (active_prefix.py) and a tenant's tokens are contiguous (one
LoRA segment). Sequences at entry layer 0 start from the embeddings, the others from their PLOT rows
(fp16, from the knowledge store), scattered into one fp32 buffer with no padding.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hmi_kernels.dispatch import use_cuda_kernels
from hmi_kernels.lora import Segments, find_segments
from hmi_kernels.plot_gather import gather

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (token ids, positions) -> layer-0 inputs


@dataclass(frozen=True)
class PackedLayout:
    """Where every sequence goes: `order[j]` is the caller's index of the j-th sequence to run."""
    order: list[int]
    entry_layers: list[int]     # in execution order, non-decreasing
    slots: list[int]            # adapter slot per sequence, in execution order
    lengths: list[int]          # tokens per sequence, in execution order
    bounds: list[int]           # n+1 offsets of the sequences in the packed buffer

    @classmethod
    def of(cls, entry_layers: Sequence[int], slots: Sequence[int], lengths: Sequence[int]) -> PackedLayout:
        order = sorted(range(len(entry_layers)), key=lambda i: (entry_layers[i], slots[i]))
        ordered_lengths = [int(lengths[i]) for i in order]
        bounds = np.concatenate([[0], np.cumsum(ordered_lengths)]).astype(np.int64).tolist()
        return cls(order, [entry_layers[i] for i in order], [slots[i] for i in order], ordered_lengths, bounds)

    @property
    def tokens(self) -> int:
        return self.bounds[-1]

    @property
    def embedded(self) -> list[int]:
        """Execution positions of the sequences that start at the embeddings (entry layer 0)."""
        return [j for j, entry in enumerate(self.entry_layers) if entry == 0]

    @property
    def from_plot(self) -> list[int]:
        """Execution positions of the sequences that start at their PLOT rows (entry layer > 0)."""
        return [j for j, entry in enumerate(self.entry_layers) if entry > 0]

    def segments(self) -> Segments:
        """Tenant segments over the packed tokens (consecutive sequences of one slot merged)."""
        per_token = [slot for slot, length in zip(self.slots, self.lengths) for _ in range(length)]
        return find_segments(per_token, self.bounds)


@dataclass
class PlotRows:
    """A batch's PLOT rows (fp16 [n, H]) and the packed row each one goes to (int64 [n])."""
    rows: torch.Tensor
    dest: torch.Tensor
    ready: object | None = None   # a torch.cuda.Event to wait for when the rows were copied on a side stream

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and destinations usable on `device` by the current stream."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(self.ready)
            self.rows.record_stream(stream)   # allocated on the copy stream, freed after use here
            self.dest.record_stream(stream)
        return self.rows.to(device), self.dest.to(device)


def plot_rows(layout: PackedLayout, rows_of: Callable[[int], np.ndarray]) -> PlotRows | None:
    """Every PLOT row of the batch in one host tensor (`rows_of(j)`: those of execution position j)."""
    members = layout.from_plot
    if not members:
        return None
    rows = torch.from_numpy(np.concatenate([rows_of(j) for j in members]))
    dest = torch.cat([torch.arange(layout.bounds[j], layout.bounds[j + 1]) for j in members])
    return PlotRows(rows, dest)


@dataclass
class PackedInputs:
    """What the upper layers take for one batch or step."""
    hidden: torch.Tensor        # [tokens, H] fp32: every sequence's input at its entry layer
    bounds: list[int]           # n+1 offsets, execution order
    entry_layers: list[int]     # per sequence, non-decreasing
    segments: Segments          # tenant segments over the tokens


def pack_inputs(layout: PackedLayout, *, hidden_size: int, device: torch.device, embed: Embed,
                token_ids_of: Callable[[int], np.ndarray], first_position_of: Callable[[int], int],
                plot: PlotRows | None) -> PackedInputs:
    """Embeds the entry-layer-0 sequences (`token_ids_of(j)` from position `first_position_of(j)`), puts the
    PLOT rows in place and computes the segments (on the device when the CUDA kernels run them)."""
    hidden = torch.empty(layout.tokens, hidden_size, dtype=torch.float32, device=device)
    bounds, lengths = layout.bounds, layout.lengths
    embedded = layout.embedded
    if embedded:
        ids = torch.from_numpy(np.concatenate([token_ids_of(j) for j in embedded]).astype(np.int64)).to(device)
        positions = torch.cat([torch.arange(first_position_of(j), first_position_of(j) + lengths[j])
                               for j in embedded]).to(device)
        rows = embed(ids, positions)
        cursor = 0
        for j in embedded:
            hidden[bounds[j]:bounds[j + 1]] = rows[cursor:cursor + lengths[j]]
            cursor += lengths[j]
    if plot is not None:   # one gather of every PLOT row into place
        gather(hidden, *plot.on(device))
    segments = layout.segments()
    if use_cuda_kernels(device):
        segments = segments.on_device(layout.tokens, device)
    return PackedInputs(hidden, bounds, layout.entry_layers, segments)
