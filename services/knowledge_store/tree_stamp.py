"""What a PLOT row cache outside the store needs to stay exact: a stamp naming the state of a domain's tree
and its ancestors', and the position-offset tables in a form that travels.

A cached answer for a token's context is the row of the deepest node on its path. Builds (a new generation and
revision) and pruning (a node removed: the path falls back to its parent) change such answers; adding a node
from traffic does not change any answer a cache holds, because caches keep only answers at the full depth the
context allows (or any answer, while the domain does not learn) and a node is only added where no domain of the
chain has it. So the stamp covers the store, whether the domain learns, and each chain domain's id, revision,
generation and pruned count.
"""
from __future__ import annotations

import hashlib

import numpy as np
from safetensors.numpy import load, save

from services.knowledge_store.records import DomainRecord


def tree_stamp(store_id: str, chain: list[DomainRecord], learning: bool) -> str:
    """`learning`: whether the domain learns from traffic (caches hold shallow answers only while it does not)."""
    text = ";".join([store_id, str(learning)] + [f"{r.id}:{r.revision}:{r.generation}:{r.pruned}" for r in chain])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def encode_offset_tables(tables: dict[int, np.ndarray]) -> bytes:
    """Chain link -> float32 [context, positions, hidden] table, as safetensors (no table: b"")."""
    if not tables:
        return b""
    return save({str(link): np.ascontiguousarray(table, dtype=np.float32) for link, table in tables.items()})


def decode_offset_tables(data: bytes) -> dict[int, np.ndarray]:
    if not data:
        return {}
    return {int(name): table for name, table in load(data).items()}
