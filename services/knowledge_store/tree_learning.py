"""Frequency-based tree management: the knowledge tree learns from the contexts lookups ask for.

Lookups only read. What they saw goes to an in-memory `TrafficLog` (bounded); a maintenance thread
flushes it into LMDB in one write transaction (`traffic` counts of contexts deeper than the tree, plus
a few sample sequences each; node hit counts), materialises contexts whose count crossed the domain's
threshold (vector = the domain's lower model at that token over the sampled sequences, like a corpus
build), and prunes the coldest leaves to keep the domain within its storage budget. A killed process
loses at most the counts of one flush interval, never a committed node.
"""
from __future__ import annotations

import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

from services.knowledge_store.knowledge_tree import LookupResult
from services.knowledge_store.layout import node_key

TRAFFIC_HEADER = struct.Struct("<QH")   # count, number of samples
SAMPLE_HEADER = struct.Struct("<HH")    # position of the token, sequence length
SAMPLES_PER_CONTEXT = 3


@dataclass
class Sample:
    position: int
    ids: np.ndarray   # uint32 token ids of (a window of) the sequence the context occurred in


@dataclass
class PendingTraffic:
    """What one domain's lookups saw since the last flush."""
    counts: Counter = field(default_factory=Counter)            # node key of a missing context -> count
    samples: dict[bytes, list[Sample]] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)             # node key that served a token -> count
    dropped: int = 0                                           # contexts not counted (table full)


def sample_window(ids: np.ndarray, position: int, max_tokens: int) -> Sample:
    """The sequence around a position, at most max_tokens long, keeping more left than right context."""
    if len(ids) <= max_tokens:
        return Sample(position, ids.astype(np.uint32))
    start = min(max(0, position - (3 * max_tokens) // 4), len(ids) - max_tokens)
    return Sample(position - start, ids[start:start + max_tokens].astype(np.uint32))


def encode_traffic(count: int, samples: list[Sample]) -> bytes:
    parts = [TRAFFIC_HEADER.pack(count, len(samples))]
    for sample in samples:
        parts.append(SAMPLE_HEADER.pack(sample.position, len(sample.ids)))
        parts.append(sample.ids.astype("<u4").tobytes())
    return b"".join(parts)


def decode_traffic(data: bytes) -> tuple[int, list[Sample]]:
    count, number = TRAFFIC_HEADER.unpack_from(data)
    offset, samples = TRAFFIC_HEADER.size, []
    for _ in range(number):
        position, length = SAMPLE_HEADER.unpack_from(data, offset)
        offset += SAMPLE_HEADER.size
        samples.append(Sample(position, np.frombuffer(data, dtype="<u4", count=length, offset=offset).copy()))
        offset += 4 * length
    return count, samples


def merge_samples(old: list[Sample], new: list[Sample]) -> list[Sample]:
    return (old + new)[:SAMPLES_PER_CONTEXT]


class TrafficLog:
    """Thread-safe, bounded record of lookups per domain id, taken and cleared by each flush."""

    def __init__(self, max_pending: int = 50_000, sample_tokens: int = 128, recent_lookups: int = 1000) -> None:
        self.max_pending = max_pending
        self.sample_tokens = sample_tokens
        self._lock = threading.Lock()
        self._pending: dict[int, PendingTraffic] = {}
        self._recent: dict[int, deque] = {}
        self._recent_size = recent_lookups

    def record(self, domain_id: int, result: LookupResult, token_ids: np.ndarray, offsets: np.ndarray,
               learning: bool) -> None:
        depth_counts = np.bincount(result.hit_depths, minlength=2)[1:]
        with self._lock:
            self._recent.setdefault(domain_id, deque(maxlen=self._recent_size)).append(depth_counts)
            if not learning:
                return
            pending = self._pending.setdefault(domain_id, PendingTraffic())
            pending.hits.update(result.hit_keys)
            for miss in result.misses:
                key = node_key(domain_id, miss.path)
                if key not in pending.counts and len(pending.counts) >= self.max_pending:
                    pending.dropped += 1
                    continue
                pending.counts[key] += 1
                held = pending.samples.setdefault(key, [])
                if len(held) < SAMPLES_PER_CONTEXT:
                    ids = token_ids[offsets[miss.sequence]:offsets[miss.sequence + 1]]
                    held.append(sample_window(ids, miss.position, self.sample_tokens))

    def record_hits(self, domain_id: int, hits: Counter | None, depth_counts: np.ndarray) -> None:
        """Node hits a row cache served (it caches no answers that could have gone deeper, so no misses);
        `hits` None: the domain is not learning, only the hit depths are kept."""
        with self._lock:
            self._recent.setdefault(domain_id, deque(maxlen=self._recent_size)).append(depth_counts)
            if hits:
                self._pending.setdefault(domain_id, PendingTraffic()).hits.update(hits)

    def take(self) -> dict[int, PendingTraffic]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def recent_hit_depths(self, domain_id: int, context: int) -> list[int]:
        """Tokens per hit depth over the domain's most recent lookups (index 0 = depth 1)."""
        with self._lock:
            recent = list(self._recent.get(domain_id, ()))
        total = np.zeros(context, dtype=np.int64)
        for counts in recent:
            width = min(len(counts), context)
            total[:width] += counts[:width]
        return total.tolist()

    def forget(self, domain_id: int) -> None:
        with self._lock:
            self._pending.pop(domain_id, None)
            self._recent.pop(domain_id, None)

