"""PLOT lookups: each token's row by its left context, down the domain's chain, with position offsets (or raw
for a row cache), streamed in slices; and the hits a row cache reports, counted as the store's own."""
from __future__ import annotations

import logging
from collections import Counter
from typing import Iterator

import lmdb
import numpy as np

from services.common.codec import positions_in_sequences
from services.common.errors import FailedPrecondition, InvalidArgument, StaleVersion
from services.common.limits import MAX_CONTEXT
from services.knowledge_store import knowledge_tree as tree
from services.knowledge_store.knowledge_tree import LookupResult
from services.knowledge_store.layout import node_key
from services.knowledge_store.position_offsets import apply_chain_offsets
from services.knowledge_store.records import DomainRecord
from services.knowledge_store.store_base import StoreBase
from services.knowledge_store.store_settings import (
    LOOKUP_SLICE_TOKENS,
    MAX_REPORTED_NODES,
    check_name,
)
from services.knowledge_store.tree_stamp import tree_stamp

log = logging.getLogger("hmi.store")


class LookupsPart(StoreBase):
    def lookup(self, domain: str, token_ids: np.ndarray, offsets: np.ndarray, context: int = 0,
               first_positions: np.ndarray | None = None, context_tokens: np.ndarray | None = None,
               domain_revision: int = 0, raw: bool = False, known_stamp: str = "") -> tuple[DomainRecord, LookupResult]:
        """`context` (0 = the domain's) may cap the depth: the accuracy study reads one tree at every k.

        `raw` (for a row cache, tree_stamp.py): rows without position offsets, the result's `stamp`, and the
        chain's offset tables in `offset_tables` unless the tree is at `known_stamp`.

        A generating decoder sends a window of recent tokens per sequence: `first_positions` gives the
        position of each window's first token in its text (for position offsets) and `context_tokens` how
        many leading tokens are only left context; the result then holds the other tokens' rows only.
        `domain_revision` (0 = any) must be the domain's current one: a caller that resolved an older build
        (or a deleted domain of the same name) gets StaleVersion, never another tree's rows."""
        check_name("domain", domain)
        if len(token_ids) > self.settings.max_lookup_tokens:
            raise InvalidArgument(f"lookup of {len(token_ids)} tokens exceeds the limit of "
                                  f"{self.settings.max_lookup_tokens} (the store's --max-lookup-tokens); split it")
        with self.layout.read(buffers=True) as txn:
            record = self._domain_at(txn, domain, domain_revision)
            vocab = self.dims_of(record).vocab
            if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= vocab):
                raise InvalidArgument(f"token ids must lie in [0, {vocab})")
            if record.split_layer == 0:
                raise FailedPrecondition(f"domain {domain!r} has split layer 0: it has no PLOT to look up")
            if not record.built_at:
                raise FailedPrecondition(f"domain {domain!r} has no PLOT yet: run `hmi domain build {domain} "
                                         f"--corpus FILE --split-layer {record.split_layer}`")
            learning_domain = self.learns(record)
            learning = not context and learning_domain
            cap = min(context or MAX_CONTEXT, record.context)
            chain_records = self.chain_records(txn, record)
            chain = [link.id for link in chain_records]
            skip = None if context_tokens is None else context_tokens.tolist()
            result = tree.lookup(self.layout, txn, chain, cap, record.hidden_size, token_ids, offsets,
                                 collect=learning, skip=skip)
            within = positions_in_sequences(offsets)
            positions = within if first_positions is None else within + np.repeat(first_positions, np.diff(offsets))
            if skip is not None:
                wanted = within >= np.repeat(context_tokens, np.diff(offsets))
                result.vectors, result.hit_depths, result.owners = (result.vectors[wanted], result.hit_depths[wanted],
                                                                    result.owners[wanted])
                positions = positions[wanted]
            if raw:
                result.stamp = tree_stamp(self.layout.store_id, chain_records, learning_domain)
                result.learning = learning_domain
                if result.stamp != known_stamp:
                    result.offset_tables = {link: table.copy() for link, table in self._offset_tables(txn, chain)}
            elif len(result.vectors):   # each token gets the position offsets of the domain whose node served it
                tables = dict(self._offset_tables(txn, chain))
                result.vectors = apply_chain_offsets(result.vectors, result.owners, tables, cap, positions)
        self.traffic.record(record.id, result, token_ids, offsets, learning)
        return record, result

    def _offset_tables(self, txn: lmdb.Transaction, chain: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(chain link, position-offset table) of each domain of the chain that has one (views into `txn`)."""
        for link, domain_id in enumerate(chain):
            table = tree.read_offsets(self.layout, txn, domain_id)
            if table is not None:
                yield link, table

    def lookup_slices(self, domain: str, token_ids: np.ndarray, offsets: np.ndarray,
                      first_positions: np.ndarray | None = None, context_tokens: np.ndarray | None = None,
                      domain_revision: int = 0, raw: bool = False, known_stamp: str = "",
                      slice_tokens: int = LOOKUP_SLICE_TOKENS) -> Iterator[tuple[DomainRecord, LookupResult]]:
        """The lookup a few thousand tokens (whole sequences) at a time, so a large answer streams out without
        being held in memory at once. A rebuild between two slices fails the call (StaleVersion: retry);
        traffic growth between slices is fine (every row is one the tree served at that moment)."""
        if len(token_ids) > self.settings.max_lookup_tokens:
            raise InvalidArgument(f"lookup of {len(token_ids)} tokens exceeds the limit of "
                                  f"{self.settings.max_lookup_tokens} (the store's --max-lookup-tokens); split it")
        first = None
        count = len(offsets) - 1
        start = 0
        while start < count:
            end = start + 1
            while end < count and offsets[end + 1] - offsets[start] <= slice_tokens:
                end += 1
            base = offsets[start]
            record, result = self.lookup(
                domain, token_ids[base:offsets[end]], offsets[start:end + 1] - base,
                first_positions=None if first_positions is None else first_positions[start:end],
                context_tokens=None if context_tokens is None else context_tokens[start:end],
                domain_revision=domain_revision, raw=raw, known_stamp=known_stamp)
            if first is None:
                first = record
                known_stamp = result.stamp   # later slices need no tables, only the same tree
            elif (record.id, record.generation) != (first.id, first.generation):
                raise StaleVersion(f"domain {domain!r} was rebuilt during the lookup; retry")
            elif raw and result.stamp != known_stamp:
                raise StaleVersion(f"domain {domain!r}'s tree changed during the lookup (rebuilt or pruned); retry")
            yield record, result
            start = end

    def record_cached_hits(self, domain: str, domain_revision: int, paths: np.ndarray, owners: np.ndarray,
                           counts: np.ndarray) -> str:
        """Counts tokens a row cache served (each row of `paths` a node's path, -1 past its depth, held by chain
        link `owners`) as this store's own lookups would have; returns the tree's current stamp."""
        check_name("domain", domain)
        if paths.ndim != 2 or not (len(paths) == len(owners) == len(counts)):
            raise InvalidArgument(f"paths [nodes, context], owners and counts must agree: {paths.shape}, "
                                  f"{len(owners)}, {len(counts)}")
        if len(paths) > MAX_REPORTED_NODES:
            raise InvalidArgument(f"{len(paths)} nodes reported at once; at most {MAX_REPORTED_NODES}")
        with self.layout.read(buffers=True) as txn:
            record = self._domain_at(txn, domain, domain_revision)
            chain = self.chain_records(txn, record)
            stamp = tree_stamp(self.layout.store_id, chain, self.learns(record))
        if not len(paths):
            return stamp
        depths = (paths >= 0).sum(axis=1)
        valid = paths[np.arange(paths.shape[1])[None, :] < depths[:, None]]
        if paths.shape[1] > record.context or depths.min() < 1 or (paths[:, 0] < 0).any():
            raise InvalidArgument(f"each path needs 1..{record.context} tokens (the domain's context), then -1")
        vocab = self.dims_of(record).vocab
        if valid.max() >= vocab or owners.max() >= len(chain) or counts.min() < 1 or counts.max() > 2**32:
            raise InvalidArgument(f"token ids must lie in [0, {vocab}), owners in [0, {len(chain)}) and counts in "
                                  f"[1, 2^32]")
        keys: Counter | None = None
        if self.learns(record):   # node counts matter only to a learning tree
            keys = Counter()
            for path, depth, owner, count in zip(paths.tolist(), depths.tolist(), owners.tolist(), counts.tolist()):
                keys[node_key(chain[owner].id, tuple(path[:depth]))] += count
        depth_counts = np.bincount(depths, weights=counts, minlength=record.context + 1)[1:].astype(np.int64)
        self.traffic.record_hits(record.id, keys, depth_counts)
        return stamp

