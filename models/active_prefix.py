"""The per-layer loop over a packed batch whose sequences enter at different layers.

Sequences are ordered by entry layer (their domain's split layer: 0 starts at the embeddings, L > 0
at the PLOT rows of layer L), so the sequences that run layer i are a prefix of the batch, and so are
their tokens. Each layer runs over that prefix only; the later tokens wait unchanged for their layer.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivePrefix:
    """The part of the batch that runs one layer: its first `sequences` sequences, its first `tokens` tokens."""
    layer: int
    sequences: int
    tokens: int


def run_active_prefix(hidden: torch.Tensor, bounds: Sequence[int], entry_layers: Sequence[int], num_layers: int,
                      layer_step: Callable[[ActivePrefix, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Runs layers 0..num_layers-1, each as layer_step(prefix, hidden of its tokens); returns the last states."""
    for layer in range(num_layers):
        sequences = sum(1 for entry in entry_layers if entry <= layer)
        if sequences == 0:
            continue
        prefix = ActivePrefix(layer, sequences, bounds[sequences])
        updated = layer_step(prefix, hidden[:prefix.tokens])
        # Out of place: autograd keeps each layer's input for the backward pass (trainers).
        hidden = updated if prefix.tokens == len(hidden) else torch.cat([updated, hidden[prefix.tokens:]])
    return hidden
