"""The gateway's tunable limits with their defaults, written once: the flags of `hmi serve gateway` take their
defaults from here, and so do the batcher and the generation limits. Light on purpose (no numpy, no torch):
the CLI reads it to build its help."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.limits import MAX_TOP_LOGPROBS


@dataclass
class BatcherSettings:
    max_batch_tokens: int = 8192
    max_batch_tenants: int = 32         # distinct adapters per batch; below compute's slots / in-flight batches
    max_wait_ms: float = 5.0
    max_queue: int = 4096               # sequences waiting
    max_queue_tokens: int = 65536       # their tokens
    max_queue_per_tenant: int = 1024    # sequences one tenant may have waiting (unless its limits say otherwise)


@dataclass(frozen=True)
class GenerationLimits:
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 2048
    max_stop_strings: int = 8
    max_stop_chars: int = 128
    max_prompt_chars: int = 100_000
    max_top_logprobs: int = MAX_TOP_LOGPROBS   # alternatives per token a request may ask for
