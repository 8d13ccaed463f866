"""The knowledge tree of a domain: a trie over context paths, each node a mean layer-L vector.

A context path is the token, then up to k-1 tokens before it (nearest first). Every vocabulary token
has a depth-1 node, so a lookup always hits; it takes the deepest node matching the actual left
context (back-off as in an n-gram model). Node existence is monotone in depth (a path occurs at
least as often as any extension of it), so the walk stops at the first miss.
"""
from __future__ import annotations

from dataclasses import dataclass

import lmdb
import numpy as np

from services.knowledge_store.layout import (NODE_VALUE, ROWS_PER_BLOCK, StoreLayout, block_key,
                                             domain_prefix, node_key)


@dataclass
class TreeContents:
    """A built tree ready to be written: node paths with counts, and their vectors (row i = node i)."""
    paths: list[tuple[int, ...]]
    counts: np.ndarray      # int64 [n]
    vectors: np.ndarray     # float16 [n, hidden]


@dataclass
class LookupResult:
    vectors: np.ndarray         # float16 [tokens, hidden]
    hit_depths: np.ndarray      # int32 [tokens]


def write_tree(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, tree: TreeContents) -> int:
    """Replaces the domain's nodes and blocks inside the caller's write transaction; returns bytes written."""
    layout.delete_prefix(txn, "nodes", domain_prefix(domain_id))
    layout.delete_prefix(txn, "blocks", domain_prefix(domain_id))
    vectors = np.ascontiguousarray(tree.vectors, dtype="<f2")
    for block in range(0, len(vectors), ROWS_PER_BLOCK):
        txn.put(block_key(domain_id, block // ROWS_PER_BLOCK), vectors[block:block + ROWS_PER_BLOCK].tobytes(),
                db=layout.db["blocks"])
    nodes = layout.db["nodes"]
    for index, (path, count) in enumerate(zip(tree.paths, tree.counts.tolist())):
        txn.put(node_key(domain_id, path),
                NODE_VALUE.pack(index // ROWS_PER_BLOCK, index % ROWS_PER_BLOCK, count), db=nodes)
    return int(vectors.nbytes)


def lookup(layout: StoreLayout, txn: lmdb.Transaction, domain_id: int, context: int, hidden: int,
           token_ids: np.ndarray, offsets: np.ndarray) -> LookupResult:
    """Deepest-context vector for every token of every packed sequence, in one read transaction."""
    nodes, blocks = layout.db["nodes"], layout.db["blocks"]
    row_bytes = hidden * 2
    out = np.empty((len(token_ids), hidden), dtype=np.float16)
    out_bytes = out.view(np.uint8).reshape(len(token_ids), row_bytes)
    depths = np.zeros(len(token_ids), dtype=np.int32)
    block_cache: dict[int, memoryview] = {}
    tokens = token_ids.tolist()
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        for position in range(start, end):
            found = None
            depth = 0
            for depth_try in range(1, min(context, position - start + 1) + 1):
                path = tokens[position - depth_try + 1:position + 1][::-1]
                value = txn.get(node_key(domain_id, tuple(path)), db=nodes)
                if value is None:
                    break
                found, depth = value, depth_try
            if found is None:
                raise KeyError(f"token id {tokens[position]} has no depth-1 node")
            block, row, _count = NODE_VALUE.unpack(found)
            data = block_cache.get(block)
            if data is None:
                data = block_cache[block] = txn.get(block_key(domain_id, block), db=blocks)
            out_bytes[position] = np.frombuffer(data, dtype=np.uint8, count=row_bytes, offset=row * row_bytes)
            depths[position] = depth
    return LookupResult(vectors=out, hit_depths=depths)
