"""Limits that two services must agree on, kept in one place."""
from __future__ import annotations

# The deepest context path (k) a knowledge tree keys: the store refuses deeper domains, and a generating
# compute sends each new token's PLOT lookup with that many tokens (itself and its left context).
MAX_CONTEXT = 16

# The largest LoRA rank a compute replica's adapter slots hold by default (compute's --max-rank); the store
# refuses adapters above its own --max-rank, which defaults to the same, so nothing registered is unservable.
DEFAULT_MAX_RANK = 16

# The most likeliest alternatives per token a generation may ask log-probabilities for: the gateway refuses
# more, and compute (which computes them) checks the same.
MAX_TOP_LOGPROBS = 20
