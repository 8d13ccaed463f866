"""Layer-L inputs the accuracy study compares with what the store serves (bench/accuracy.py --methods).

- `WindowPlot`: both-sided windows. A token is keyed by the tokens on both sides of it, (left, token,
  right), with back-off from the widest window to the token alone; each key's vector is the mean layer-L
  state of its occurrences in the corpus, plus per-position offsets (as the store's left contexts have).
  An encoder's lower layers look both ways, so this was the first candidate to beat left contexts; the
  study measured it (docs/accuracy.md) and kept the store's left contexts.
- `TrueStates`: the lower model's exact layer-L states of every input (no PLOT at all): the upper bound of
  any PLOT at a split layer, since it isolates what the tenant loses by adapting fewer layers.

Both answer `lookup(domain, sequences, bridged=False)` like the store's client, so the tenant trainer
(training) builds its examples from them unchanged.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from services.knowledge_store.plot_builder import PlotBuilder

EDGE = -1   # the key of a neighbour beyond either end of the sequence


def window_shapes(radius: int) -> list[tuple[int, int]]:
    """(left, right) widths, widest first, the right side backing off first: radius 1 ->
    (1, 1), (1, 0), (0, 0); radius 2 -> (2, 2), (2, 1), (1, 1), (1, 0), (0, 0)."""
    shapes = []
    for width in range(radius, 0, -1):
        shapes += [(width, width), (width, width - 1)]
    return shapes + [(0, 0)]


def window_keys(ids: np.ndarray, left: int, right: int) -> list[tuple[int, ...]]:
    padded = np.concatenate([np.full(left, EDGE), np.asarray(ids, dtype=np.int64), np.full(right, EDGE)])
    return [tuple(padded[i:i + left + right + 1].tolist()) for i in range(len(ids))]


class WindowPlot:
    def __init__(self, builder: PlotBuilder, split_layer: int, radius: int, min_count: int = 2,
                 max_tokens: int = 128, position_offsets: bool = True) -> None:
        self.builder = builder
        self.split_layer = split_layer
        self.shapes = window_shapes(radius)
        self.min_count = min_count
        self.max_tokens = max_tokens
        self.position_offsets = position_offsets
        self.tables: dict[tuple[int, int], dict[tuple[int, ...], np.ndarray]] = {}
        self.offsets: np.ndarray | None = None

    def build(self, lines: list[str], batch_size: int = 64) -> WindowPlot:
        sequences = self.builder.tokenize([line.strip() for line in lines if line.strip()], self.max_tokens)
        states = true_states(self.builder, sequences, self.split_layer, batch_size)
        for shape in self.shapes:
            sums: dict[tuple[int, ...], np.ndarray] = {}
            counts: dict[tuple[int, ...], int] = defaultdict(int)
            for ids, state in zip(sequences, states):
                for position, key in enumerate(window_keys(np.asarray(ids), *shape)):
                    if key in sums:
                        sums[key] += state[position]
                    else:
                        sums[key] = state[position].astype(np.float64)
                    counts[key] += 1
            least = 1 if shape == (0, 0) else self.min_count
            self.tables[shape] = {key: (total / counts[key]).astype(np.float16)
                                  for key, total in sums.items() if counts[key] >= least}
        if self.position_offsets:
            hidden = states[0].shape[1] if states else 0
            residual = np.zeros((self.max_tokens, hidden))
            seen = np.zeros(self.max_tokens)
            for ids, state in zip(sequences, states):
                served = self._raw(np.asarray(ids)).astype(np.float64)
                positions = np.arange(len(ids))
                np.add.at(residual, positions, state - served)
                np.add.at(seen, positions, 1)
            for position in range(1, self.max_tokens):   # positions never seen take the one before
                if seen[position] == 0:
                    residual[position], seen[position] = residual[position - 1], max(seen[position - 1], 1)
            self.offsets = (residual / np.maximum(seen, 1)[:, None]).astype(np.float32)
        return self

    @property
    def nodes(self) -> int:
        return sum(len(table) for table in self.tables.values())

    def _raw(self, ids: np.ndarray) -> np.ndarray:
        keyed = {shape: window_keys(ids, *shape) for shape in self.shapes}
        out = None
        for position in range(len(ids)):
            for shape in self.shapes:
                vector = self.tables[shape].get(keyed[shape][position])
                if vector is not None:
                    break
            if vector is None:   # a token the corpus never showed: the lower model on the token alone
                vector = self.builder.isolated_vectors(self.split_layer, lambda *a: None)[int(ids[position])].numpy()
            if out is None:
                out = np.zeros((len(ids), len(vector)), np.float32)
            out[position] = vector
        return out

    def lookup(self, domain: str, sequences: list[np.ndarray], bridged: bool = False) -> list[np.ndarray]:
        rows = []
        for ids in sequences:
            raw = self._raw(np.asarray(ids))
            if self.offsets is not None:
                raw = raw + self.offsets[np.minimum(np.arange(len(ids)), len(self.offsets) - 1)]
            rows.append(raw.astype(np.float16))
        return rows


class TrueStates:
    def __init__(self, builder: PlotBuilder, split_layer: int) -> None:
        self.builder = builder
        self.split_layer = split_layer

    def lookup(self, domain: str, sequences: list[np.ndarray], bridged: bool = False) -> list[np.ndarray]:
        return [state.astype(np.float16) for state in
                true_states(self.builder, [list(map(int, ids)) for ids in sequences], self.split_layer)]


def true_states(builder: PlotBuilder, sequences: list[list[int]], split_layer: int,
                batch_size: int = 64) -> list[np.ndarray]:
    """float32 [T, H] layer-L states of each sequence, from the lower model."""
    out: list[np.ndarray] = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        hidden, _mask = builder.lower_outputs(batch, split_layer)
        out.extend(hidden[row, :len(ids)].float().numpy() for row, ids in enumerate(batch))
    return out
