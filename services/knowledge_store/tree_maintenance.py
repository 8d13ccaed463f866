"""Frequency-based tree management: flushing the traffic log, materialising hot contexts, pruning cold
leaves to the budget. The traffic it works from is collected by `TrafficLog` (tree_learning.py) during
lookups; every change is one LMDB write transaction, so readers see whole tree states only.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from services.knowledge_store import knowledge_tree as tree
from services.knowledge_store.layout import path_of
from services.knowledge_store.tree_learning import (
    SAMPLES_PER_CONTEXT,
    PendingTraffic,
    decode_traffic,
    encode_traffic,
    merge_samples,
)

if TYPE_CHECKING:
    from services.knowledge_store.store import KnowledgeStore

log = logging.getLogger("hmi.store")


class TreeMaintenance:
    def __init__(self, store: "KnowledgeStore") -> None:
        self.store = store

    def learn_once(self) -> dict[str, int]:
        """Flushes the traffic log: counts, then materialisation and pruning. Returns what changed."""
        summary = {"counted": 0, "materialized": 0, "pruned": 0}
        pending_all = self.store.traffic.take()
        if not pending_all:
            return summary
        names = {record["id"]: record["name"] for record in self.store.list_domains()}
        for domain_id, pending in pending_all.items():
            if domain_id not in names:
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
        with self.store.layout.env.begin(write=True) as txn:
            record = self.store._domain_record(txn, name)
            if record is None:
                return candidates, None
            threshold = self.store.effective_threshold(record.get("learn_threshold", 0))
            traffic = self.store.layout.db["traffic"]
            tree.add_hits(self.store.layout, txn, pending.hits)
            for key, count in pending.counts.items():
                old = txn.get(key, db=traffic)
                if old is None:
                    total, samples = count, pending.samples.get(key, [])
                    record["traffic_entries"] = record.get("traffic_entries", 0) + 1
                else:
                    total, samples = decode_traffic(bytes(old))
                    total += count
                    if len(samples) < SAMPLES_PER_CONTEXT:
                        samples = merge_samples(samples, pending.samples.get(key, []))
                txn.put(key, encode_traffic(total, samples), db=traffic)
                if 0 < threshold <= total and len(candidates) < self.store.settings.max_materialize:
                    candidates[key] = [total, samples]
            if record["traffic_entries"] > self.store.settings.max_traffic_entries:
                record["traffic_entries"] -= self._forget_rare_traffic(txn, record)
            self.store.layout.put_json(txn, "domains", name, record)
        if pending.dropped:
            log.warning("domain %s: %d contexts not counted (more than %d distinct per flush)", name,
                        pending.dropped, self.store.settings.max_pending_contexts)
        return candidates, record

    def _forget_rare_traffic(self, txn, record: dict[str, Any]) -> int:
        """Keeps the counted-context table bounded: drops the entries at or below the median count."""
        cursor = txn.cursor(db=self.store.layout.db["traffic"])
        prefix = record["id"].to_bytes(4, "big")
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
                txn.delete(key, db=self.store.layout.db["traffic"])
                removed += 1
        return removed

    def _materialize(self, record: dict[str, Any], candidates: dict[bytes, list]) -> tuple[int, int]:
        """Vectors by the domain's lower model (outside any txn), then nodes added and the budget kept in one txn."""
        builder = self.store._domain_builder(record)
        keys = sorted(candidates, key=len)   # parents before children
        batch, where = [], []
        for index, key in enumerate(keys):
            for sample in candidates[key][1]:
                batch.append(sample.ids.astype(np.int64).tolist())
                where.append((index, sample.position))
        if not batch:
            return 0, 0
        sums = np.zeros((len(keys), record["hidden_size"]), dtype=np.float64)
        seen = np.zeros(len(keys), dtype=np.int64)
        table = self.store._offsets(record)   # node + offset[position] should give the states seen
        shift = table[-1] if table is not None else None
        for start in range(0, len(batch), 32):
            hidden, _ = builder.lower_outputs(batch[start:start + 32], record["split_layer"])
            for row, (index, position) in enumerate(where[start:start + 32]):
                state = hidden[row, position].double().numpy()
                if shift is not None:
                    state = state - shift[min(position, len(shift) - 1)]
                sums[index] += state
                seen[index] += 1
        vectors = (sums / np.maximum(seen, 1)[:, None]).astype(np.float16)
        with self.store.layout.env.begin(write=True) as txn:
            current = self.store._domain_record(txn, record["name"])
            if current is None or current["generation"] != record["generation"]:
                return 0, 0   # rebuilt or deleted meanwhile: these counts belong to a tree that is gone
            chain = self.store._chain(txn, current)
            chosen = []
            for index, key in enumerate(keys):
                path = path_of(key)
                missing = not tree.node_exists(self.store.layout, txn, chain, path)
                has_parent = len(path) == 1 or tree.node_exists(self.store.layout, txn, chain, path[:-1])
                if seen[index] and missing and has_parent:
                    chosen.append(index)
                else:
                    txn.delete(key, db=self.store.layout.db["traffic"])
                    current["traffic_entries"] -= 1
            rows, current["rows"] = tree.allocate_rows(self.store.layout, txn, current["id"], current["rows"],
                                                       len(chosen))
            tree.write_rows(self.store.layout, txn, current["id"], current["hidden_size"], rows, vectors[chosen])
            for row, index in zip(rows, chosen):
                key = keys[index]
                path = path_of(key)
                tree.add_node(self.store.layout, txn, current["id"], path, row, candidates[key][0])
                txn.delete(key, db=self.store.layout.db["traffic"])
                current["traffic_entries"] -= 1
                while len(current["nodes_per_depth"]) < len(path):
                    current["nodes_per_depth"].append(0)
                current["nodes_per_depth"][len(path) - 1] += 1
            current["nodes"] += len(chosen)
            current["materialized"] = current.get("materialized", 0) + len(chosen)
            current["plot_bytes"] = current["nodes"] * self.store.row_bytes(record)
            pruned = self.prune(txn, current)
            self.store.layout.put_json(txn, "domains", current["name"], current)
        if chosen:
            log.info("domain %s: materialised %d context(s) from traffic, pruned %d", record["name"], len(chosen),
                     pruned)
        return len(chosen), pruned

    def prune(self, txn, record: dict[str, Any]) -> int:
        """Removes the coldest leaves until the domain's vectors fit its budget (updates the record)."""
        budget = self.store.effective_budget(record.get("budget_bytes", 0))
        removed_total = 0
        min_depth = 1 if record.get("parent") else 2   # a root's depth-1 nodes are every lookup's last resort
        while record["nodes"] * self.store.row_bytes(record) > budget:
            excess = record["nodes"] - budget // self.store.row_bytes(record)
            leaves = sorted(tree.leaves(self.store.layout, txn, record["id"], min_depth), key=lambda leaf: leaf.count)
            if not leaves:
                break
            removed = tree.remove_leaves(self.store.layout, txn, record["id"], leaves[:excess])
            for depth, count in enumerate(removed):
                record["nodes_per_depth"][depth] -= count
            record["nodes"] -= sum(removed)
            removed_total += sum(removed)
        record["pruned"] = record.get("pruned", 0) + removed_total
        record["plot_bytes"] = record["nodes"] * self.store.row_bytes(record)
        return removed_total
