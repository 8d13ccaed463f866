"""Limits that two services must agree on, kept in one place."""
from __future__ import annotations

# The deepest context path (k) a knowledge tree keys: the store refuses deeper domains, and a generating
# compute sends each new token's PLOT lookup with that many tokens (itself and its left context).
MAX_CONTEXT = 16
