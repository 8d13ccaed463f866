"""The benchmark's workload: tenants with Zipf popularity, texts of realistic lengths, arrivals.

Texts are the sentences of the repo's demo corpus (and any file given), so lengths follow real text.
Everything is drawn from one seed: every system sees the same tenants, texts and arrival times.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_CORPUS = Path(__file__).resolve().parent.parent.parent / "data" / "demo_corpus.txt"


@dataclass
class WorkloadSpec:
    tenants: int
    zipf: float = 1.0
    duration: float = 30.0
    mode: str = "closed"          # "closed": `clients` loops; "open": Poisson arrivals at `rate` per second
    clients: int = 16
    rate: float = 50.0
    seed: int = 0
    corpus: Path = DEMO_CORPUS
    task: str = "classify"        # or "generate": every request generates max_new_tokens (greedy)
    max_new_tokens: int = 32


@dataclass
class Request:
    tenant: int
    text: str
    at: float = 0.0               # seconds after the start (open loop)


def zipf_weights(n: int, alpha: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** alpha
    return weights / weights.sum()


def load_texts(path: Path) -> list[str]:
    """One text per line; a `.jsonl` file (a labeled data set) gives the "text" field of each line."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [" ".join(str(json.loads(line)["text"]).split()) for line in lines]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: every line must be a JSON object with a \"text\" field ({error})") from None
    texts = [line for line in lines if line]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def make_requests(spec: WorkloadSpec, count: int) -> list[Request]:
    """`count` requests: tenant by Zipf rank (tenant 0 the most popular), text uniformly from the corpus."""
    rng = np.random.default_rng(spec.seed)
    texts = load_texts(spec.corpus)
    tenants = rng.choice(spec.tenants, size=count, p=zipf_weights(spec.tenants, spec.zipf))
    chosen = rng.integers(0, len(texts), size=count)
    gaps = rng.exponential(1.0 / spec.rate, size=count) if spec.mode == "open" else np.zeros(count)
    times = np.cumsum(gaps)
    return [Request(int(t), texts[int(i)], float(at)) for t, i, at in zip(tenants, chosen, times)]


def sweep_requests(spec: WorkloadSpec) -> list[Request]:
    """One request for every tenant: proves each one is servable."""
    texts = load_texts(spec.corpus)
    rng = random.Random(spec.seed + 1)
    return [Request(tenant, rng.choice(texts)) for tenant in range(spec.tenants)]
