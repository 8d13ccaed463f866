"""The knowledge tree of a domain: a trie over context paths, each node a mean layer-L vector.

A context path is the token, then up to k-1 tokens before it (nearest first). Every vocabulary token
has a depth-1 node in the root domain of a domain tree, so a lookup always hits; it takes the deepest
node matching the actual left context (back-off as in an n-gram model), searching the domain first and
then its ancestors at each depth. Node existence is monotone in depth (a path is only added when its
parent exists, and only leaves are pruned), so the walk stops at the first depth nobody has.

A node key is its domain id followed by its path, so a node's children sort right after it: a node is
a leaf exactly when the next key does not extend it. Vector rows live in blocks; rows freed by pruning
are listed in `free_rows` and reused before the domain grows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import lmdb
import numpy as np

from services.knowledge_store.layout import (
    NODE_VALUE,
    OFFSETS_HEADER,
    ROWS_PER_BLOCK,
    StoreLayout,
    block_key,
    domain_prefix,
    free_row_key,
    node_key,
)


@dataclass
class TreeContents:
    """A built tree ready to be written: node paths with counts, and their vectors (row i = node i)."""
    paths: list[tuple[int, ...]]
    counts: np.ndarray      # int64 [n]
    vectors: np.ndarray     # float16 [n, hidden]
    offsets: np.ndarray | None = None   # float32 [k, positions, hidden] (position_offsets.py)
    held_out: tuple[list[np.ndarray], list[np.ndarray]] | None = None   # (rows, true states): what a bridge
                                                                        # distils on (plot_builder.HeldOutCapture)


@dataclass
class Miss:
    """A context deeper than the deepest node found, and where it occurred (for learning from traffic)."""
    path: tuple[int, ...]
    sequence: int
    position: int


@dataclass
class LookupResult:
    vectors: np.ndarray         # float16 [tokens, hidden]
    hit_depths: np.ndarray      # int32 [tokens]
    owners: np.ndarray | None = None   # int32 [tokens]: index in the chain of the domain whose node served it
    hit_keys: list[bytes] = field(default_factory=list)   # node key that served each token
    misses: list[Miss] = field(default_factory=list)
    stamp: str = ""                                                  # raw lookups: the tree's stamp (tree_stamp.py)
    learning: bool = False                                           # raw lookups: the domain learns from traffic
    offset_tables: dict[int, np.ndarray] = field(default_factory=dict)   # raw lookups: chain link -> table


def write_tree(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, tree: TreeContents) -> int:
    """Replaces the domain's nodes and blocks inside the caller's write transaction; returns bytes written."""
    clear_domain(layout, txn, domain_id)
    vectors = np.ascontiguousarray(tree.vectors, dtype="<f2")
    for block in range(0, len(vectors), ROWS_PER_BLOCK):
        txn.put(block_key(domain_id, block // ROWS_PER_BLOCK), vectors[block:block + ROWS_PER_BLOCK].tobytes(),
                db=layout.db["blocks"])
    nodes = layout.db["nodes"]
    for index, (path, count) in enumerate(zip(tree.paths, tree.counts.tolist())):
        txn.put(node_key(domain_id, path),
                NODE_VALUE.pack(index // ROWS_PER_BLOCK, index % ROWS_PER_BLOCK, count), db=nodes)
    if tree.offsets is not None:
        table = np.ascontiguousarray(tree.offsets, dtype="<f4")
        txn.put(domain_prefix(domain_id), OFFSETS_HEADER.pack(*table.shape) + table.tobytes(), db=layout.db["offsets"])
    return int(vectors.nbytes)


def read_offsets(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int) -> np.ndarray | None:
    raw = txn.get(domain_prefix(domain_id), db=layout.db["offsets"])
    if raw is None:
        return None
    shape = OFFSETS_HEADER.unpack_from(raw)
    return np.frombuffer(raw, dtype="<f4", offset=OFFSETS_HEADER.size).reshape(shape)


def clear_domain(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int) -> None:
    for db in ("nodes", "blocks", "free_rows", "traffic", "offsets"):
        layout.delete_prefix(txn, db, domain_prefix(domain_id))


def lookup(layout: StoreLayout, txn: lmdb.Transaction, chain: list[int], context: int, hidden: int,
           token_ids: np.ndarray, offsets: np.ndarray, *, collect: bool = False,
           skip: list[int] | None = None) -> LookupResult:
    """Deepest-context vector for every token of every packed sequence, in one read transaction.

    `chain` is the domain's id, then its ancestors' ids. With `collect`, also reports which node served
    each token and the contexts that went deeper than the tree (what traffic learning counts). `skip`:
    per sequence, how many leading tokens are left context only (their rows are left unset)."""
    nodes, blocks = layout.db["nodes"], layout.db["blocks"]
    row_bytes = hidden * 2
    out = np.empty((len(token_ids), hidden), dtype=np.float16)
    out_bytes = out.view(np.uint8).reshape(len(token_ids), row_bytes)
    depths = np.zeros(len(token_ids), dtype=np.int32)
    owners = np.zeros(len(token_ids), dtype=np.int32)
    result = LookupResult(vectors=out, hit_depths=depths, owners=owners)
    block_cache: dict[tuple[int, int], memoryview] = {}
    tokens = token_ids.tolist()
    for sequence, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        for position in range(start + (skip[sequence] if skip else 0), end):
            found, owner, found_key, depth = None, 0, b"", 0
            available = min(context, position - start + 1)
            for depth_try in range(1, available + 1):
                path = tuple(tokens[position - depth_try + 1:position + 1][::-1])
                value = None
                for link, domain_id in enumerate(chain):
                    key = node_key(domain_id, path)
                    value = txn.get(key, db=nodes)
                    if value is not None:
                        found, owner, found_key, depth = value, domain_id, key, depth_try
                        owners[position] = link
                        break
                if value is None:
                    if collect:
                        result.misses.append(Miss(path, sequence, position - start))
                    break
            if found is None:
                raise KeyError(f"token id {tokens[position]} has no depth-1 node")
            block, row, _count = NODE_VALUE.unpack(found)
            data = block_cache.get((owner, block))
            if data is None:
                data = block_cache[(owner, block)] = txn.get(block_key(owner, block), db=blocks)
            out_bytes[position] = np.frombuffer(data, dtype=np.uint8, count=row_bytes, offset=row * row_bytes)
            depths[position] = depth
            if collect:
                result.hit_keys.append(found_key)
    return result


# ---- changing a tree in place (traffic learning, pruning); all inside the caller's write txn ----------


def allocate_rows(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, high_water: int,
                  count: int) -> tuple[list[int], int]:
    """Rows for `count` new vectors: freed rows first, then new ones; returns them and the new high water."""
    rows: list[int] = []
    cursor = txn.cursor(db=layout.db["free_rows"])
    prefix = domain_prefix(domain_id)
    while len(rows) < count and cursor.set_range(prefix) and bytes(cursor.key()).startswith(prefix):
        rows.append(int.from_bytes(bytes(cursor.key())[4:], "big"))
        cursor.delete()
    while len(rows) < count:
        rows.append(high_water)
        high_water += 1
    return rows, high_water


def write_rows(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, hidden: int, rows: list[int],
               vectors: np.ndarray) -> None:
    row_bytes = hidden * 2
    vectors = np.ascontiguousarray(vectors, dtype="<f2")
    by_block: dict[int, list[tuple[int, int]]] = {}
    for index, row in enumerate(rows):
        by_block.setdefault(row // ROWS_PER_BLOCK, []).append((row % ROWS_PER_BLOCK, index))
    blocks = layout.db["blocks"]
    for block, items in by_block.items():
        key = block_key(domain_id, block)
        data = bytearray(txn.get(key, db=blocks) or b"")
        needed = (max(row for row, _ in items) + 1) * row_bytes
        if len(data) < needed:
            data.extend(bytes(needed - len(data)))
        for row, index in items:
            data[row * row_bytes:(row + 1) * row_bytes] = vectors[index].tobytes()
        txn.put(key, bytes(data), db=blocks)


def add_node(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, path: tuple[int, ...], row: int,
             count: int) -> None:
    txn.put(node_key(domain_id, path), NODE_VALUE.pack(row // ROWS_PER_BLOCK, row % ROWS_PER_BLOCK, count),
            db=layout.db["nodes"])


def add_hits(layout: StoreLayout, txn: lmdb.Transaction, hits: dict[bytes, int]) -> None:
    """Adds traffic hits to node counts (the frequency pruning ranks by); nodes pruned meanwhile are skipped."""
    nodes = layout.db["nodes"]
    for key, hits_here in hits.items():
        value = txn.get(key, db=nodes)
        if value is not None:
            block, row, count = NODE_VALUE.unpack(value)
            txn.put(key, NODE_VALUE.pack(block, row, count + hits_here), db=nodes)


def node_exists(layout: StoreLayout, txn: lmdb.Transaction, chain: list[int], path: tuple[int, ...]) -> bool:
    return any(txn.get(node_key(domain_id, path), db=layout.db["nodes"]) is not None for domain_id in chain)


@dataclass
class Leaf:
    key: bytes
    depth: int
    count: int
    row: int


def leaves(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, min_depth: int) -> list[Leaf]:
    """Nodes of the domain with no child in it, at depth >= min_depth (one pass over its keys)."""
    result: list[Leaf] = []
    prefix = domain_prefix(domain_id)
    cursor = txn.cursor(db=layout.db["nodes"])
    if not cursor.set_range(prefix):
        return result
    previous: tuple[bytes, bytes] | None = None
    for raw_key, raw_value in cursor:
        key = bytes(raw_key)
        if not key.startswith(prefix):
            break
        if previous is not None and not key.startswith(previous[0]):
            result.extend(_leaf(*previous, min_depth))
        previous = (key, bytes(raw_value))
    if previous is not None:
        result.extend(_leaf(*previous, min_depth))
    return result


def _leaf(key: bytes, value: bytes, min_depth: int) -> list[Leaf]:
    depth = len(key) // 4 - 1
    if depth < min_depth:
        return []
    block, row, count = NODE_VALUE.unpack(value)
    return [Leaf(key, depth, count, block * ROWS_PER_BLOCK + row)]


def remove_leaves(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, chosen: list[Leaf]) -> list[int]:
    """Deletes the nodes, frees their rows; returns the number removed per depth (index 0 = depth 1)."""
    removed: list[int] = []
    for leaf in chosen:
        txn.delete(leaf.key, db=layout.db["nodes"])
        txn.put(free_row_key(domain_id, leaf.row), b"", db=layout.db["free_rows"])
        while len(removed) < leaf.depth:
            removed.append(0)
        removed[leaf.depth - 1] += 1
    return removed
