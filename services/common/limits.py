"""Limits that two services must agree on, kept in one place."""
from __future__ import annotations

# The deepest context path (k) a knowledge tree keys: the store refuses deeper domains, and a generating
# compute sends each new token's PLOT lookup with that many tokens (itself and its left context).
MAX_CONTEXT = 16

# The largest LoRA rank compute's adapter slots hold by default (--max-rank, HMI_MAX_RANK): the store refuses
# adapters above it at registration, so a tenant that registers is one compute can serve.
DEFAULT_MAX_RANK = 16
