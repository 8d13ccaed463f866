"""The knowledge store's settings and limits, with their defaults written once (the store's flags read
them), and what every part checks a name with."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import InvalidArgument, quoted
from services.common.limits import DEFAULT_MAX_RANK

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_LABELS = 1000
MAX_LABEL_CHARS = 256
CHANGES_PER_REPLY = 10_000   # change-log entries one ListChanges answer holds at most by default
LOOKUP_SLICE_TOKENS = 8192   # a streamed lookup computes and sends this many tokens' rows at a time
MAX_REPORTED_NODES = 1_000_000   # nodes one RecordTraffic call may count


@dataclass
class StoreSettings:
    data_dir: Path
    model_dir: Path
    model_name: str
    map_size: int = 1 << 30                   # initial LMDB map; grown (doubling) up to max_map_size
    max_map_size: int = 64 << 30
    default_rank: int = 8
    max_rank: int = DEFAULT_MAX_RANK          # what compute's adapter slots hold (both read HMI_MAX_RANK)
    max_corpus_bytes: int = 256 << 20
    max_adapter_bytes: int = 256 << 20
    max_lookup_tokens: int = 1 << 16          # rows one Lookup may ask for (64 Ki tokens: 48 MiB at hidden 384)
    max_adapt_steps: int = 5000
    max_adapt_batch: int = 64
    follower_wait: float = 2.0                # a write waits at most this long for gateways to read it
    max_sequence_tokens: int = 128
    default_budget_bytes: int = 512 << 20     # per domain: 100 domains in 50 GiB
    default_learn_threshold: int = 8          # lookups of a missing context before it is materialised
    learn_interval: float = 2.0               # seconds between flushes of the traffic log
    max_pending_contexts: int = 50_000        # distinct missing contexts counted per domain between flushes
    max_traffic_entries: int = 200_000        # counted contexts kept per domain in LMDB
    max_materialize: int = 1024               # contexts materialised per flush (the rest on their next lookup)
    max_file_bytes: int = 64 << 20            # a training file
    max_owner_files: int = 100                # training files one key (owner) may keep at once (0: no limit)
    max_owner_file_bytes: int = 1 << 30       # their bytes together (0: no limit)
    max_training_examples: int = 200_000      # examples in one training file
    max_job_examples: int = 2_000_000         # examples x epochs one fine-tuning job trains on
    max_active_jobs: int = 2                  # fine-tuning jobs queued or running per tenant
    max_training_tokens_per_day: int = 0      # tokens a tenant's jobs may train on in 24 h (0: no limit)
    extra_models: dict[str, Path] = field(default_factory=dict)   # more base models: name -> folder


def check_name(kind: str, name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidArgument(f"{kind} {quoted(name)} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
                              f"starting with a letter or digit")
    return name
