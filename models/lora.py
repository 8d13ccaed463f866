"""Adding tenants' LoRA deltas at a projection: the one way encoder and decoder layers apply them.

Every (layer, target) has slot-stacked matrices, A [slots, rank, in] and B [slots, out, rank] with
alpha / rank already folded into B: compute's adapter pool holds one slot per resident adapter, a
trainer one slot for the tenant it trains. The batch's segments name each token's slot, so one call
adds every tenant's delta over the packed tokens (hmi_kernels/lora.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hmi_kernels.lora import Segments, sgmv

LoRAKey = tuple[int, str]   # (layer, target)


@dataclass(frozen=True)
class LoRAWeights:
    """Slot-stacked LoRA matrices per (layer, target); a projection without an entry has no LoRA."""
    a: Mapping[LoRAKey, torch.Tensor] = field(default_factory=dict)
    b: Mapping[LoRAKey, torch.Tensor] = field(default_factory=dict)
    slot_ranks: torch.Tensor | None = None   # int32 rank per slot: the CUDA kernels skip the padding beyond it


@dataclass(frozen=True)
class LayerLoRA:
    """What every projection of one layer needs to add its tenants' LoRA deltas."""
    weights: LoRAWeights
    layer: int
    segments: Segments

    def add(self, out: torch.Tensor, x: torch.Tensor, target: str) -> torch.Tensor:
        """out += each token's tenant delta of x at this (layer, target), in place; returns out."""
        key = (self.layer, target)
        if key in self.weights.a:
            sgmv(out, x, self.segments, self.weights.a[key], self.weights.b[key], self.weights.slot_ranks)
        return out

    def project(self, x: torch.Tensor, linear: torch.nn.Module, target: str) -> torch.Tensor:
        """A shared projection (computed once for every token: an nn.Linear, or a low-precision copy of one)
        plus the tenants' deltas, computed from x as it is."""
        shared = F.linear(x, linear.weight, linear.bias) if type(linear) is torch.nn.Linear else linear(x)
        return self.add(shared, x, target)
