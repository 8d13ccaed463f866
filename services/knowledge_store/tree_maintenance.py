"""Frequency-based tree management: flushing the traffic log, materialising hot contexts, pruning cold
leaves to the budget. The traffic it works from is collected by `TrafficLog` (tree_learning.py) during
lookups; every change is one LMDB write transaction, so readers see whole tree states only.

It works through a narrow, public part of the store (`MaintainedStore`): domain records read and saved
inside its transactions, a domain's ancestry, lower model and position offsets, and the budget policy.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol

import lmdb
import numpy as np

from services.knowledge_store import knowledge_tree as tree
from services.knowledge_store.layout import StoreLayout, path_of
from services.knowledge_store.plot_builder import PlotBuilder
from services.knowledge_store.records import DomainRecord
from services.knowledge_store.tree_learning import (
    SAMPLES_PER_CONTEXT,
    PendingTraffic,
    TrafficLog,
    decode_traffic,
    encode_traffic,
    merge_samples,
)

if TYPE_CHECKING:
    from services.knowledge_store.store_settings import StoreSettings

log = logging.getLogger("hmi.store")


class MaintainedStore(Protocol):
    """What tree maintenance needs of the store."""
    layout: StoreLayout
    settings: StoreSettings
    traffic: TrafficLog
    stopping: threading.Event       # set when the store stops: the current flush ends early

    def list_domains(self) -> list[DomainRecord]: ...
    def domain_in(self, txn: lmdb.Transaction, name: str) -> DomainRecord | None: ...
    def save_domain(self, txn: lmdb.Transaction, record: DomainRecord) -> None: ...
    def ancestry(self, txn: lmdb.Transaction, record: DomainRecord) -> list[int]: ...
    def lower_model(self, record: DomainRecord) -> PlotBuilder: ...
    def position_offsets(self, record: DomainRecord) -> np.ndarray | None: ...
    def effective_budget(self, budget_bytes: int) -> int: ...
    def effective_threshold(self, learn_threshold: int) -> int: ...


class TreeMaintenance:
    def __init__(self, store: MaintainedStore) -> None:
        self.store = store
        self.layout = store.layout
        self.settings = store.settings

    def learn_once(self) -> dict[str, int]:
        """Flushes the traffic log: counts, then materialisation and pruning. Returns what changed."""
        summary = {"counted": 0, "materialized": 0, "pruned": 0}
        pending_all = self.store.traffic.take()
        if not pending_all:
            return summary
        names = {record.id: record.name for record in self.store.list_domains()}
        for domain_id, pending in pending_all.items():
            if domain_id not in names or self.store.stopping.is_set():
                continue
            candidates, record = self._count_traffic(names[domain_id], pending)
            summary["counted"] += len(pending.counts)
            if record is None or not candidates:
                continue
            added, pruned = self._materialize(record, candidates)
            summary["materialized"] += added
            summary["pruned"] += pruned
        return summary

    def _count_traffic(self, name: str, pending: PendingTraffic):
        """One write txn: node hit counts and missing-context counts; returns contexts over the threshold."""
        candidates: dict[bytes, list] = {}
        traffic = self.layout.db["traffic"]

        def write(txn):
            candidates.clear()     # a retry (after the map grew) starts over
            record = self.store.domain_in(txn, name)
            if record is None:
                return None
            threshold = self.store.effective_threshold(record.learn_threshold)
            tree.add_hits(self.layout, txn, pending.hits)
            for key, count in pending.counts.items():
                old = txn.get(key, db=traffic)
                if old is None:
                    total, samples = count, pending.samples.get(key, [])
                    record.traffic_entries += 1
                else:
                    total, samples = decode_traffic(bytes(old))
                    total += count
                    if len(samples) < SAMPLES_PER_CONTEXT:
                        samples = merge_samples(samples, pending.samples.get(key, []))
                txn.put(key, encode_traffic(total, samples), db=traffic)
                if 0 < threshold <= total and len(candidates) < self.settings.max_materialize:
                    candidates[key] = [total, samples]
            if record.traffic_entries > self.settings.max_traffic_entries:
                record.traffic_entries -= self._forget_rare_traffic(txn, record)
            self.store.save_domain(txn, record)
            return record

        record = self.layout.write(write)
        if record is None:
            return candidates, None
        if pending.dropped:
            log.warning("domain %s: %d contexts not counted (more than %d distinct per flush)", name,
                        pending.dropped, self.settings.max_pending_contexts)
        return candidates, record

    def _forget_rare_traffic(self, txn, record: DomainRecord) -> int:
        """Keeps the counted-context table bounded: drops the entries at or below the median count."""
        traffic = self.layout.db["traffic"]
        cursor = txn.cursor(db=traffic)
        prefix = record.id.to_bytes(4, "big")
        entries = []
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not bytes(key).startswith(prefix):
                    break
                entries.append((decode_traffic(bytes(value))[0], bytes(key)))
        median = sorted(count for count, _ in entries)[len(entries) // 2]
        removed = 0
        for count, key in entries:
            if count <= median:
                txn.delete(key, db=traffic)
                removed += 1
        return removed

    def _materialize(self, record: DomainRecord, candidates: dict[bytes, list]) -> tuple[int, int]:
        """Vectors by the domain's lower model (outside any txn), then nodes added and the budget kept in one txn."""
        builder = self.store.lower_model(record)
        keys = sorted(candidates, key=len)   # parents before children
        batch, where = [], []
        for index, key in enumerate(keys):
            for sample in candidates[key][1]:
                batch.append(sample.ids.astype(np.int64).tolist())
                where.append((index, sample.position))
        if not batch:
            return 0, 0
        sums = np.zeros((len(keys), record.hidden_size), dtype=np.float64)
        seen = np.zeros(len(keys), dtype=np.int64)
        table = self.store.position_offsets(record)   # node + offset[position] should give the states seen
        shift = table[-1] if table is not None else None
        for start in range(0, len(batch), 32):
            hidden, _ = builder.lower_outputs(batch[start:start + 32], record.split_layer)
            for row, (index, position) in enumerate(where[start:start + 32]):
                state = hidden[row, position].double().numpy()
                if shift is not None:
                    state = state - shift[min(position, len(shift) - 1)]
                sums[index] += state
                seen[index] += 1
        vectors = (sums / np.maximum(seen, 1)[:, None]).astype(np.float16)
        traffic = self.layout.db["traffic"]

        def write(txn) -> tuple[list[int], int]:
            current = self.store.domain_in(txn, record.name)
            if current is None or current.generation != record.generation:
                return [], 0   # rebuilt or deleted meanwhile: these counts belong to a tree that is gone
            chain = self.store.ancestry(txn, current)
            chosen = []
            for index, key in enumerate(keys):
                path = path_of(key)
                missing = not tree.node_exists(self.layout, txn, chain, path)
                has_parent = len(path) == 1 or tree.node_exists(self.layout, txn, chain, path[:-1])
                if seen[index] and missing and has_parent:
                    chosen.append(index)
                else:
                    txn.delete(key, db=traffic)
                    current.traffic_entries -= 1
            rows, current.rows = tree.allocate_rows(self.layout, txn, current.id, current.rows, len(chosen))
            tree.write_rows(self.layout, txn, current.id, current.hidden_size, rows, vectors[chosen])
            for row, index in zip(rows, chosen):
                key = keys[index]
                path = path_of(key)
                tree.add_node(self.layout, txn, current.id, path, row, candidates[key][0])
                txn.delete(key, db=traffic)
                current.traffic_entries -= 1
                while len(current.nodes_per_depth) < len(path):
                    current.nodes_per_depth.append(0)
                current.nodes_per_depth[len(path) - 1] += 1
            current.nodes += len(chosen)
            current.materialized += len(chosen)
            current.plot_bytes = current.nodes * record.row_bytes
            pruned = self.prune(txn, current)
            self.store.save_domain(txn, current)
            return chosen, pruned

        chosen, pruned = self.layout.write(write)
        if chosen:
            log.info("domain %s: materialised %d context(s) from traffic, pruned %d", record.name, len(chosen),
                     pruned)
        return len(chosen), pruned

    def prune(self, txn, record: DomainRecord) -> int:
        """Removes the coldest leaves until the domain's vectors fit its budget (updates the record)."""
        budget = self.store.effective_budget(record.budget_bytes)
        removed_total = 0
        min_depth = 1 if record.parent else 2   # a root's depth-1 nodes are every lookup's last resort
        while record.nodes * record.row_bytes > budget:
            excess = record.nodes - budget // record.row_bytes
            leaves = sorted(tree.leaves(self.layout, txn, record.id, min_depth), key=lambda leaf: leaf.count)
            if not leaves:
                break
            removed = tree.remove_leaves(self.layout, txn, record.id, leaves[:excess])
            for depth, count in enumerate(removed):
                record.nodes_per_depth[depth] -= count
            record.nodes -= sum(removed)
            removed_total += sum(removed)
        record.pruned += removed_total
        record.plot_bytes = record.nodes * record.row_bytes
        return removed_total
