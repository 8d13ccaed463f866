"""Position offsets: what a PLOT vector loses by averaging a context over every position it occurs at.

A node's vector is the mean layer-L state of its context over the corpus, wherever it occurred; the
position embedding added at the bottom of the model is averaged away, so the upper layers would see
every token as if at no position in particular. The offset table restores it on average:

    offset[c][p] = mean over corpus tokens at position p of (true layer-L state - vector served at depth cap c)

and a lookup returns vector + offset[c][p] (compute's row cache holds rows without it and adds it with the same
function, `apply_chain_offsets`). It costs one [k, P, H] fp32 table per domain (0.8 MiB for MiniLM at k = 4,
P = 128). On SST-2 at L = 1, k = 1 it moved the hPLM from 2.4 points below the full model to level with it
(docs/accuracy.md).
"""
from __future__ import annotations

import numpy as np
import torch


class PositionResiduals:
    """Accumulates true states per position and, per depth cap, which node serves each token."""

    def __init__(self, context: int, max_positions: int, hidden: int) -> None:
        self.context = context
        self.state_sums = torch.zeros(max_positions, hidden, dtype=torch.float64)
        self.counts = torch.zeros(max_positions, dtype=torch.int64)
        self.served: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(context)]

    def add(self, positions: torch.Tensor, states: torch.Tensor, served_by_cap: list[list[int]]) -> None:
        self.state_sums.index_add_(0, positions, states.double())
        self.counts.index_add_(0, positions, torch.ones_like(positions))
        for cap, nodes in enumerate(served_by_cap):
            self.served[cap].append((positions, torch.tensor(nodes, dtype=torch.long)))

    def offsets(self, vectors: torch.Tensor, chunk: int = 65536) -> np.ndarray:
        """float32 [k, P, H] against the vectors as stored (fp16); positions never seen repeat the last seen."""
        stored = vectors.float()
        seen = int(torch.nonzero(self.counts).max()) + 1 if self.counts.any() else 1
        table = np.zeros((self.context, seen, stored.shape[1]), dtype=np.float32)
        counts = self.counts[:seen].clamp(min=1).double().unsqueeze(1)
        for cap in range(self.context):
            served_sums = torch.zeros_like(self.state_sums)
            for positions, nodes in self.served[cap]:
                for start in range(0, len(nodes), chunk):
                    served_sums.index_add_(0, positions[start:start + chunk],
                                           stored[nodes[start:start + chunk]].double())
            residual = ((self.state_sums - served_sums)[:seen] / counts).float()
            empty = self.counts[:seen] == 0
            for position in range(seen):   # gaps (no token there) take the previous position's offset
                if empty[position] and position:
                    residual[position] = residual[position - 1]
            table[cap] = residual.numpy()
        return table


def apply_offsets(vectors: np.ndarray, table: np.ndarray, cap: int, positions: np.ndarray) -> np.ndarray:
    """vectors (fp16 [n, H]) + table[cap - 1][position] (positions past the table use its last row), rounded to
    fp16. The conversions run in torch: several times faster than numpy's, with the same rounding."""
    rows = table[min(cap, table.shape[0]) - 1]
    offsets = np.ascontiguousarray(rows[np.minimum(positions, rows.shape[0] - 1)], dtype=np.float32)   # a copy
    vectors = np.require(vectors, dtype=np.float16, requirements=["C", "W"])
    return (torch.from_numpy(vectors).float() + torch.from_numpy(offsets)).half().numpy()


def apply_chain_offsets(vectors: np.ndarray, owners: np.ndarray, tables: dict[int, np.ndarray], cap: int,
                        positions: np.ndarray) -> np.ndarray:
    """Each row gets the offsets of the domain whose node served it (`owners`: its chain link; `tables`: chain
    link -> table, for the domains that have one). The store's lookups and compute's row cache both apply it."""
    if not tables or not len(vectors):
        return vectors
    if len(tables) == 1 and (owners == next(iter(tables))).all():
        return apply_offsets(vectors, next(iter(tables.values())), cap, positions)
    vectors = vectors.copy()
    for link, table in tables.items():
        served = owners == link
        if served.any():
            vectors[served] = apply_offsets(vectors[served], table, cap, positions[served])
    return vectors
