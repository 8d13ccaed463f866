"""Builds a domain's PLOT: runs the lower model (embeddings + layers [0, L)) over a corpus and keeps
the mean layer-L vector of every context path that occurs at least `min_count` times.

Two passes keep memory bounded by the nodes kept, not by the corpus: count paths on token ids first,
then encode and accumulate sums only for kept nodes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from models.lower import is_decoder_base, lower_states
from services.common.errors import InvalidArgument
from services.knowledge_store.knowledge_tree import TreeContents
from services.knowledge_store.position_offsets import PositionResiduals

Progress = Callable[[str, int, int], None]


@dataclass
class BuildSettings:
    split_layer: int
    context: int
    min_count: int
    max_sequence_tokens: int = 128
    batch_size: int = 32
    position_offsets: bool = True     # see position_offsets.py
    capture_tokens: int = 0           # keep up to this many corpus tokens' true states and held-out rows


class HeldOutCapture:
    """What a domain bridge distils on (bridge_distillation.py): true layer-L states of corpus sequences, and
    the rows serving would give them had they not been in the corpus.

    Rows of the corpus itself are in-sample: each token's own state is part of the mean it is served, so
    they are closer to the truth than the rows of new text, and a bridge trained on them learns to correct
    errors that serving does not have (measured: it barely helps). So a token's row leaves its own
    occurrence out, (sum - state) / (count - 1), backing off to a shallower node where fewer than
    `min_count` other occurrences remain (depth 1: none; then the node's stored vector). And only
    sequences that occur inside no longer corpus sequence are kept, longest first: a corpus of overlapping
    excerpts (phrases cut from sentences) would otherwise leave a sequence's text in the means through its
    excerpts. The builder therefore builds a bridged domain's PLOT from the corpus's distinct maximal
    sequences only (`maximal_sequences`), and a left-out occurrence is then a whole held-out text, as at
    serving time. Keeps the longest sequences, at most `limit` tokens."""

    def __init__(self, limit: int, sequences: list[list[int]]) -> None:
        self.limit = limit
        self.wanted: set[int] = set()
        tokens = 0
        for index in sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i)):
            if tokens >= limit:
                break
            self.wanted.add(index)
            tokens += len(sequences[index])
        self.states: list[torch.Tensor] = []         # fp16 [T, H] per kept sequence
        self.nodes: list[list[list[int]]] = []       # per kept sequence, per token: node per depth
        self._pending: dict[int, list[list[int]]] = {}

    def note(self, index: int, found: list[int]) -> None:
        if index in self.wanted:
            self._pending.setdefault(index, []).append(list(found))

    def keep(self, first_index: int, batch: list[list[int]], hidden: torch.Tensor) -> None:
        for row, ids in enumerate(batch):
            nodes = self._pending.pop(first_index + row, None)
            if nodes is not None:
                self.states.append(hidden[row, :len(ids)].to(torch.float16).clone())
                self.nodes.append(nodes)

    def rows(self, sums: torch.Tensor, counts: torch.Tensor, min_count: int, offsets: np.ndarray | None,
             vectors: torch.Tensor) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(held-out rows as served, with position offsets; true states): fp16 [T, H] per kept sequence."""
        rows_out, targets = [], []
        for states16, nodes in zip(self.states, self.nodes):
            states = states16.float()
            out = torch.empty_like(states)
            for position, found in enumerate(nodes):
                chosen = None
                for depth in range(len(found), 0, -1):
                    node = found[depth - 1]
                    others = int(counts[node]) - 1
                    if others >= (min_count if depth > 1 else 1):
                        chosen = (sums[node].float() - states[position]) / others
                        break
                out[position] = chosen if chosen is not None else vectors[found[0]].float()
            rows = out.numpy()
            if offsets is not None:   # what a lookup adds: the table of the domain's full depth cap
                table = offsets[-1]
                rows = rows + table[np.minimum(np.arange(len(rows)), table.shape[0] - 1)]
            rows_out.append(rows.astype(np.float16))
            targets.append(states16.numpy())
        return rows_out, targets


def maximal_sequences(sequences: list[list[int]], limit: int = 0, strip: int = 0) -> set[int]:
    """Indices of the longest sequences, up to `limit` tokens (0: no limit), whose tokens (less `strip`
    special tokens at each end) occur inside no longer sequence kept before them (exact duplicates count
    once). A candidate is only compared with the kept sequences that hold its rarest token."""
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    kept: set[int] = set()
    texts: list[str] = []
    holding: dict[int, list[int]] = {}      # token -> kept texts that contain it
    tokens = 0
    for index in order:
        ids = sequences[index]
        inner = ids[strip:len(ids) - strip] if len(ids) > 2 * strip else ids
        text = " " + " ".join(map(str, inner)) + " "
        candidates = min((holding.get(token, []) for token in set(inner)), key=len, default=[])
        if any(text in texts[k] for k in candidates):
            continue
        kept.add(index)
        for token in set(inner):
            holding.setdefault(token, []).append(len(texts))
        texts.append(text)
        tokens += len(ids)
        if limit and tokens >= limit:
            break
    return kept


def context_paths(ids: list[int], context: int):
    """Yields (position, path) for every position and depth 1..context, nearest token first."""
    for position in range(len(ids)):
        for depth in range(1, min(context, position + 1) + 1):
            yield position, tuple(ids[position - depth + 1:position + 1][::-1])


class PlotBuilder:
    """Holds the lower model of one base model; `build` is pure computation, no storage."""

    def __init__(self, model, tokenizer, vocab_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._isolated: dict[int, torch.Tensor] = {}

    def isolated_vectors(self, split_layer: int, report: Progress) -> torch.Tensor:
        """Layer-L vector of every vocabulary token alone, as `[CLS] token [SEP]`: the depth-1 vector of
        tokens the corpus never shows. The same for every domain of this model, so computed once per L."""
        cached = self._isolated.get(split_layer)
        if cached is not None:
            return cached
        decoder = is_decoder_base(self.model)
        cls_id, sep_id = (None, None) if decoder else self._specials()
        vectors = torch.empty(self.vocab_size, self.model.config.hidden_size)
        step = 1024
        for start in range(0, self.vocab_size, step):
            tokens = range(start, min(start + step, self.vocab_size))
            if decoder:   # a causal model sees a token alone at the start of a text
                hidden, _ = self.lower_outputs([[token] for token in tokens], split_layer)
                vectors[start:start + len(tokens)] = hidden[:, 0]
            else:
                hidden, _ = self.lower_outputs([[cls_id, token, sep_id] for token in tokens], split_layer)
                vectors[start:start + len(tokens)] = hidden[:, 1]
            report("vocabulary", start + len(tokens), self.vocab_size)
        self._isolated[split_layer] = vectors
        return vectors

    def tokenize(self, lines: list[str], max_tokens: int) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(lines)
        if is_decoder_base(self.model):   # a causal model's text is cut at its end
            return [enc.ids[:max_tokens] for enc in encodings]
        return [enc.ids[:max_tokens - 1] + enc.ids[-1:] if len(enc.ids) > max_tokens else enc.ids
                for enc in encodings]

    def lower_outputs(self, batch: list[list[int]], split_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-L hidden states [B, T, H] of padded sequences and their mask, from plain transformers."""
        return lower_states(self.model, batch, split_layer)

    def build(self, lines: list[str], settings: BuildSettings, progress: Progress | None = None, *,
              full_vocabulary: bool = True) -> TreeContents:
        """`full_vocabulary`: give every vocabulary token a depth-1 node (a root domain); a child domain
        keeps only the tokens its corpus shows and falls back to its parent for the rest."""
        if settings.split_layer < 1:
            raise InvalidArgument("a PLOT needs split layer >= 1 (split layer 0 runs the whole model in compute)")
        report = progress or (lambda stage, done, total: None)
        lines = [line.strip() for line in lines if line.strip()]
        sequences = self.tokenize(lines, settings.max_sequence_tokens) if lines else []
        if settings.capture_tokens:     # bridged: held-out rows must be truly held out (HeldOutCapture)
            report("deduplicating", 0, len(sequences))
            distinct = maximal_sequences(sequences, strip=0 if is_decoder_base(self.model) else 1)
            report("deduplicating", len(sequences), len(sequences))
            sequences = [ids for i, ids in enumerate(sequences) if i in distinct]

        report("counting", 0, len(sequences))
        counts: Counter[tuple[int, ...]] = Counter()
        for ids in sequences:
            counts.update(path for _, path in context_paths(ids, settings.context))
        report("counting", len(sequences), len(sequences))

        # In a root domain every vocabulary token gets a depth-1 node (index = token id); deeper nodes follow.
        deep = sorted(path for path, count in counts.items() if len(path) > 1 and count >= settings.min_count)
        tokens = range(self.vocab_size) if full_vocabulary else sorted(p[0] for p in counts if len(p) == 1)
        paths: list[tuple[int, ...]] = [(token,) for token in tokens] + deep
        index = {path: i for i, path in enumerate(paths)}
        hidden_size = self.model.config.hidden_size
        sums = torch.zeros(len(paths), hidden_size, dtype=torch.float64)
        node_counts = torch.zeros(len(paths), dtype=torch.int64)

        residuals = PositionResiduals(settings.context, settings.max_sequence_tokens, hidden_size)
        capture = HeldOutCapture(settings.capture_tokens, sequences)
        done = 0
        for start in range(0, len(sequences), settings.batch_size):
            batch = sequences[start:start + settings.batch_size]
            hidden, _mask = self.lower_outputs(batch, settings.split_layer)
            width = hidden.shape[1]
            flat_positions, node_ids = [], []           # every kept node of every token (node sums)
            token_flat, token_positions = [], []        # every token once (position offsets)
            served: list[list[int]] = [[] for _ in range(settings.context)]
            for row, ids in enumerate(batch):
                for position in range(len(ids)):
                    found = []
                    for depth in range(1, min(settings.context, position + 1) + 1):
                        node = index.get(tuple(ids[position - depth + 1:position + 1][::-1]))
                        if node is None:
                            break   # as a lookup walks: the first missing depth ends it
                        found.append(node)
                    flat_positions.extend([row * width + position] * len(found))
                    node_ids.extend(found)
                    token_flat.append(row * width + position)
                    token_positions.append(position)
                    for cap in range(settings.context):
                        served[cap].append(found[min(cap + 1, len(found)) - 1])
                    capture.note(start + row, found)
            flat_hidden = hidden.reshape(-1, hidden_size)
            node_tensor = torch.tensor(node_ids, dtype=torch.long)
            sums.index_add_(0, node_tensor, flat_hidden[flat_positions].double())
            node_counts.index_add_(0, node_tensor, torch.ones(len(node_ids), dtype=torch.int64))
            residuals.add(torch.tensor(token_positions, dtype=torch.long), flat_hidden[token_flat], served)
            capture.keep(start, batch, hidden)
            done += len(batch)
            report("encoding", done, len(sequences))

        unseen = torch.nonzero(node_counts[:self.vocab_size] == 0).flatten() if full_vocabulary else []
        if len(unseen):
            sums[unseen] = self.isolated_vectors(settings.split_layer, report)[unseen].double()

        seen = node_counts.clamp(min=1).unsqueeze(1).double()
        vectors = (sums / seen).to(torch.float16)
        if not torch.isfinite(vectors).all():
            raise InvalidArgument("layer-L vectors overflow fp16; this base model cannot use an fp16 PLOT")
        offsets = residuals.offsets(vectors) if settings.position_offsets and sequences else None
        held_out = capture.rows(sums, node_counts, settings.min_count, offsets, vectors) if capture.limit else None
        return TreeContents(paths=paths, counts=node_counts.numpy(), vectors=vectors.numpy(), offsets=offsets,
                            held_out=held_out)

    def _specials(self) -> tuple[int, int]:
        """[CLS]-like and [SEP]-like ids: the tokens the post-processor wraps a single word in."""
        ids = self.tokenizer.encode("a").ids
        return ids[0], ids[-1]
