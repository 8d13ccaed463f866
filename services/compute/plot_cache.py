"""Compute's PLOT row cache: the layer-L rows of the token contexts batches met recently, in host memory.

Without it every batch waits for a store round trip (and the store's trie walk), and a store restart fails
every request. A token's row depends only on its context path (the token, then up to `context - 1` tokens
before it) and on the tree, so rows are cached per (domain, revision) by path, without position offsets
(applied here from the domain's tables, by the store's own function), under the tree's stamp
(knowledge_store/tree_stamp.py): an answer under another stamp (a rebuild of the domain or an ancestor,
pruning) drops the domain's rows, so a row of another tree is never served.

For a domain that learns from traffic, only answers at the full depth a token's context allows are cached: a
shallower answer is one learning may improve, and the store must see the contexts it learns from, so a sequence
with such a token (or any token not cached) goes to the store whole, as without a cache. A domain that does not
learn never changes an answer but by a rebuild or pruning (both change the stamp), so every answer is cached.
What the cache served is reported to the store in the background as node hits (what pruning ranks by) by
`report_once`.

Eviction is CLOCK over a fixed arena of rows: a hit sets the row's bit, the hand clears bits and takes the
first row without one.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import Counter, Gauge

from services.common.codec import positions_in_sequences
from services.common.errors import HMIError, NotFound, StaleVersion
from services.knowledge_store.client import LookupReply, apply_chain_offsets

log = logging.getLogger("hmi.compute.plot_cache")
TOKENS = Counter("hmi_compute_plot_cache_tokens_total", "PLOT rows a batch needed, by where they came from",
                 ["source"])   # cache or store
ROWS = Gauge("hmi_compute_plot_cache_rows", "PLOT rows held in compute's row cache")
EVICTIONS = Counter("hmi_compute_plot_cache_evictions_total", "rows evicted from compute's PLOT row cache")
RESETS = Counter("hmi_compute_plot_cache_resets_total", "domains whose cached rows were dropped: their tree changed")
UNREPORTED = Counter("hmi_compute_plot_cache_unreported_total",
                     "cache hits never reported to the store (it stayed unreachable and the backlog was full)")

MAX_PENDING_HITS = 1_000_000    # per domain, tokens served but not yet reported
LINK_SHIFT = 57                 # a reported hit: chain link above this bit, the node's path key below
KEPT_STAMPS = 4                 # offset tables of this many recent stamps, for answers that raced a change

# fetch(tokens, offsets, context_tokens or None, known_stamp) -> the store's raw answer (rows of the tokens after
# each window's leading context tokens)
Fetch = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", str], LookupReply]
Report = Callable[[str, int, np.ndarray, np.ndarray, np.ndarray], str]


@dataclass
class Answer:
    """Rows of each sequence (position offsets applied), or the error that kept them from it."""
    rows: dict[int, np.ndarray]
    failures: dict[int, HMIError]
    split_layer: int
    bridge_revision: int
    hit_depth_counts: list[int]
    cached_tokens: int = 0


@dataclass
class DomainRows:
    """One (domain, revision)'s cached rows; `stamp` is the tree state every entry was read under."""
    domain: str
    revision: int
    stamp: str = ""
    context: int = 0
    split_layer: int = 0
    bridge_revision: int = 0
    learning: bool = True
    tables: OrderedDict[str, dict[int, np.ndarray]] = field(default_factory=OrderedDict)   # stamp -> tables
    entries: dict[int, int] = field(default_factory=dict)    # path key -> arena row
    pending: list[np.ndarray] = field(default_factory=list)  # hits not reported: link << LINK_SHIFT | path key
    pending_count: int = 0


def path_keys(tokens: np.ndarray, within: np.ndarray, context: int, bits: int) -> np.ndarray:
    """One int per token naming its context path: digit i (of `bits` bits) is the token i places to its left,
    plus one; 0 past the sequence start. So a key's first d digits are the key of its depth-d node."""
    digits = tokens.astype(np.int64) + 1
    keys = digits.copy()
    for back in range(1, context):
        earlier = np.zeros_like(digits)
        earlier[back:] = digits[:-back]
        keys |= np.where(within >= back, earlier, 0) << (bits * back)
    return keys


def missing_windows(tokens: np.ndarray, offsets: np.ndarray, have: np.ndarray, context: int, whole: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """What to ask the store for the tokens not in `have`: whole sequences (`whole`), or for each run of missing
    tokens a window starting `context - 1` tokens earlier (its left context, looked up but not returned).
    Returns the windows' tokens, offsets, leading context tokens (None: whole sequences) and, in the answer's
    order, the index of each token it answers."""
    pieces, skips, targets = [], [], []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        missing = np.flatnonzero(~have[start:end])
        if not len(missing):
            continue
        if whole:
            pieces.append(tokens[start:end])
            targets.append(np.arange(start, end))
            continue
        breaks = np.flatnonzero(np.diff(missing) > 1)
        for first, last in zip(np.concatenate([[0], breaks + 1]).tolist(),
                               np.concatenate([breaks, [len(missing) - 1]]).tolist()):
            a, b = start + int(missing[first]), start + int(missing[last]) + 1
            left = max(start, a - (context - 1))
            pieces.append(tokens[left:b])
            skips.append(a - left)
            targets.append(np.arange(a, b))
    window_offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    return (np.concatenate(pieces), window_offsets, None if whole else np.asarray(skips, dtype=np.int64),
            np.concatenate(targets))


def key_paths(keys: np.ndarray, context: int, bits: int) -> np.ndarray:
    """int32 [n, context] paths of path keys, -1 past each one's depth (RecordTraffic's form)."""
    mask = (1 << bits) - 1
    return np.stack([((keys >> (bits * back)) & mask) - 1 for back in range(context)], axis=1).astype(np.int32)


class PlotRowCache:
    def __init__(self, capacity_bytes: int, hidden: int, vocab: int) -> None:
        self.hidden = hidden
        self.bits = max(1, int(vocab).bit_length())
        self.capacity = max(0, capacity_bytes // (2 * hidden))
        self._arena = np.empty((self.capacity, hidden), dtype=np.float16)   # pages are touched as rows fill
        self._links = np.zeros(self.capacity, dtype=np.uint8)
        self._depths = np.zeros(self.capacity, dtype=np.uint8)
        self._referenced = np.zeros(self.capacity, dtype=bool)
        self._owners: list[tuple[DomainRows, int] | None] = [None] * self.capacity
        self._hand = 0
        self._used = 0
        self._lock = threading.Lock()
        self._views: dict[tuple[str, int], DomainRows] = {}
        self.hits = 0
        self.misses = 0

    def cacheable(self, context: int) -> bool:
        """Path keys of this context fit below LINK_SHIFT bits (the encoder's context 2-3 at any vocabulary)."""
        return self.capacity > 0 and context * self.bits <= LINK_SHIFT

    def lookup(self, domain: str, revision: int, pieces: list[np.ndarray], fetch: Fetch) -> Answer:
        """Rows for each piece (a sequence's token ids): the cached ones from here, the others in one store lookup.
        A store failure fails only the sequences that needed it."""
        with self._lock:
            view = self._views.setdefault((domain, revision), DomainRows(domain, revision))
        answer = self._lookup(view, pieces, fetch, use_cache=True)
        if answer is None:     # the tree changed between the cached rows and the store's: all from the store
            answer = self._lookup(view, pieces, fetch, use_cache=False)
        tokens = sum(len(p) for p in pieces)
        with self._lock:
            self.hits += answer.cached_tokens
            self.misses += tokens - answer.cached_tokens
        TOKENS.labels("cache").inc(answer.cached_tokens)
        TOKENS.labels("store").inc(tokens - answer.cached_tokens)
        return answer

    def _lookup(self, view: DomainRows, pieces: list[np.ndarray], fetch: Fetch, use_cache: bool) -> Answer | None:
        with self._lock:
            context, stamp, learning = view.context, view.stamp, view.learning
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        within = positions_in_sequences(offsets)
        count = len(tokens)
        rows = np.empty((count, self.hidden), dtype=np.float16)
        links = np.zeros(count, dtype=np.uint8)
        depths = np.zeros(count, dtype=np.uint8)
        have = np.zeros(count, dtype=bool)
        tables: dict[int, np.ndarray] = {}
        if use_cache and context > 0 and self.cacheable(context) and count:
            keys = path_keys(tokens, within, context, self.bits)
            # Rows are read in the same critical section as their slots: outside it a row may be evicted and reused.
            with self._lock:
                if view.stamp == stamp:
                    entries = view.entries
                    slots = np.fromiter((entries.get(k, -1) for k in keys.tolist()), dtype=np.int64, count=count)
                    have = slots >= 0
                    if learning:    # a sequence with any token not cached goes to the store whole
                        have &= np.repeat(np.minimum.reduceat(slots, offsets[:-1]) >= 0, lengths)
                    self._read_into(view, slots, have, keys, rows, links, depths)
                    tables = view.tables.get(stamp, {})
        answer = Answer({}, {}, view.split_layer, view.bridge_revision, [], cached_tokens=int(have.sum()))
        lost = np.zeros(len(pieces), dtype=bool)
        if not have.all():
            whole = learning or context == 0
            w_tokens, w_offsets, w_skip, targets = missing_windows(tokens, offsets, have, context, whole)
            try:
                reply = fetch(w_tokens, w_offsets, w_skip, stamp)
            except HMIError as error:
                lost = np.maximum.reduceat(~have, offsets[:-1]).astype(bool)
                answer.failures.update(dict.fromkeys(np.flatnonzero(lost).tolist(), error))
            else:
                with self._lock:
                    if reply.stamp != stamp and have.any():
                        self._adopt(view, reply, stamp)
                        return None
                    tables = self._adopt(view, reply, stamp)
                    if tables is None:
                        answer.failures.update(dict.fromkeys(range(len(pieces)), StaleVersion(
                            f"domain {view.domain!r}'s tree changed several times during the lookup; retry")))
                        return answer
                    rows[targets] = reply.vectors
                    links[targets] = reply.token_owners
                    depths[targets] = reply.token_depths
                    if self.cacheable(reply.context) and reply.stamp == view.stamp:
                        self._insert(view, path_keys(tokens, within, reply.context, self.bits)[targets],
                                     within[targets], reply)
                answer.split_layer, answer.bridge_revision = reply.split_layer, reply.bridge_revision
                context = reply.context
        rows = apply_chain_offsets(rows, links, tables, context, within)
        for s in np.flatnonzero(~lost).tolist():
            answer.rows[s] = rows[offsets[s]:offsets[s + 1]]
        served = np.repeat(~lost, lengths)
        answer.hit_depth_counts = np.bincount(depths[served], minlength=max(context, 1) + 1)[1:].tolist()
        return answer

    def _read_into(self, view: DomainRows, slots: np.ndarray, have: np.ndarray, keys: np.ndarray, rows: np.ndarray,
                   links: np.ndarray, depths: np.ndarray) -> None:
        """Copies the cached rows of the tokens in `have` (holding the lock) and notes them for the store."""
        wanted = slots[have]
        if not len(wanted):
            return
        rows[have] = self._arena[wanted]
        links[have] = self._links[wanted]
        depths[have] = found_depths = self._depths[wanted]
        self._referenced[wanted] = True
        if view.pending_count < MAX_PENDING_HITS:
            prefix = (np.int64(1) << (self.bits * found_depths.astype(np.int64))) - 1
            view.pending.append((links[have].astype(np.int64) << LINK_SHIFT) | (keys[have] & prefix))
            view.pending_count += len(wanted)
        else:
            UNREPORTED.inc(len(wanted))

    def _adopt(self, view: DomainRows, reply: LookupReply, known: str) -> dict[int, np.ndarray] | None:
        """Takes in what a store answer says about the tree (holding the lock): its offset tables, and a new
        stamp, which drops the rows cached under the old one. None: the answer's tables are not known here."""
        if not reply.offset_tables and reply.stamp not in view.tables and reply.stamp == known:
            return None    # the tables of the stamp asked with were dropped meanwhile (several changes in a row)
        if reply.offset_tables or reply.stamp not in view.tables:
            view.tables[reply.stamp] = reply.offset_tables
            while len(view.tables) > KEPT_STAMPS:
                view.tables.popitem(last=False)
        if reply.stamp != view.stamp:
            self._tree_changed(view, reply.stamp)
            view.stamp, view.context, view.learning = reply.stamp, reply.context, reply.learning
            view.split_layer, view.bridge_revision = reply.split_layer, reply.bridge_revision
        return view.tables[reply.stamp]

    def _insert(self, view: DomainRows, keys: np.ndarray, within: np.ndarray, reply: LookupReply) -> None:
        """Caches the answers at full depth, or all of them when the domain does not learn (holding the lock)."""
        full = reply.token_depths == np.minimum(reply.context, within + 1)
        if not reply.learning:
            full[:] = True
        entries = view.entries
        new: dict[int, int] = {}     # key -> token index, each key once
        for key, index in zip(keys[full].tolist(), np.flatnonzero(full).tolist()):
            if key not in entries and key not in new:
                new[key] = index
        if not new:
            return
        if len(new) > self.capacity // 2:    # a new row marked referenced is never evicted by its own insert
            new = dict(list(new.items())[:self.capacity // 2])
        slots = []
        for key in new:
            slot = self._allocate()
            self._referenced[slot] = True
            self._owners[slot] = (view, key)
            entries[key] = slot
            slots.append(slot)
        rows = np.fromiter(new.values(), dtype=np.int64, count=len(new))
        self._arena[slots] = reply.vectors[rows]
        self._links[slots] = reply.token_owners[rows]
        self._depths[slots] = reply.token_depths[rows]
        ROWS.set(self._used)

    def _allocate(self) -> int:
        while True:
            slot = self._hand
            self._hand = (slot + 1) % self.capacity
            owner = self._owners[slot]
            if owner is None:
                self._used += 1
                return slot
            if self._referenced[slot]:
                self._referenced[slot] = False
                continue
            view, key = owner
            if view.entries.get(key) == slot:
                del view.entries[key]
            self._owners[slot] = None
            EVICTIONS.inc()
            return slot   # the row changes hands: as many rows used as before

    def _tree_changed(self, view: DomainRows, stamp: str) -> None:
        """The store answered under another stamp: the domain's rows go (holding the lock)."""
        if view.stamp:
            RESETS.inc()
            log.info("domain %s: tree changed (stamp %s -> %s): dropped %d cached rows", view.domain, view.stamp,
                     stamp, len(view.entries))
        self._reset(view)

    def _reset(self, view: DomainRows) -> None:
        for slot in view.entries.values():
            self._owners[slot] = None
            self._referenced[slot] = False
            self._used -= 1
        view.entries = {}
        ROWS.set(self._used)

    # ---- the store's side of it ----------------------------------------------------------------

    def report_once(self, report: Report) -> int:
        """Sends every domain's unreported hits to the store (RecordTraffic); a changed stamp in the answer drops
        the domain's rows, a gone or rebuilt domain its whole view. Returns the tokens reported."""
        with self._lock:
            views = [v for v in self._views.values() if v.pending]
            work = []
            for view in views:
                work.append((view, np.concatenate(view.pending), view.context))
                view.pending, view.pending_count = [], 0
        reported = 0
        for view, hits, context in work:
            combined, counts = np.unique(hits, return_counts=True)
            links = (combined >> LINK_SHIFT).astype(np.uint8)
            paths = key_paths(combined & ((np.int64(1) << LINK_SHIFT) - 1), context, self.bits)
            try:
                stamp = report(view.domain, view.revision, paths, links, counts.astype(np.int64))
            except (NotFound, StaleVersion):
                self.forget(view.domain, view.revision)
                continue
            except Exception:   # the store is unreachable: keep the hits for the next round (bounded)
                with self._lock:
                    if view.pending_count + len(hits) <= MAX_PENDING_HITS:
                        view.pending.append(hits)
                        view.pending_count += len(hits)
                    else:
                        UNREPORTED.inc(len(hits))
                raise
            reported += len(hits)
            with self._lock:
                if stamp != view.stamp and view.stamp:
                    self._tree_changed(view, stamp)
                    view.stamp = ""
        return reported

    def forget(self, domain: str, revision: int | None = None) -> None:
        """Drops a domain's rows (every revision of it unless one is named)."""
        with self._lock:
            for key in [k for k in self._views if k[0] == domain and (revision is None or k[1] == revision)]:
                self._reset(self._views.pop(key))

    def forget_all(self) -> None:
        with self._lock:
            for view in self._views.values():
                self._reset(view)
            self._views.clear()

    @property
    def rows_held(self) -> int:
        return self._used


class TrafficReporter:
    """Background thread: reports the cache's hits to the store every `interval` seconds."""

    def __init__(self, cache: PlotRowCache, report: Report, interval: float = 1.0) -> None:
        self.cache = cache
        self.report = report
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plot-traffic", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.cache.report_once(self.report)
                failing = False
            except Exception as error:   # noqa: BLE001 - the store is down or restarting: try again later
                if not failing:
                    log.warning("could not report PLOT cache hits to the store (kept for the next try): %s",
                                str(error)[:200])
                failing = True
