"""`hmi demo` (`make demo`): the whole system on this machine in about a minute.

Starts the three services, builds the demo domain's PLOT from the corpus the repo ships, registers
a few hundred tenants with their own random adapters and heads, classifies a mix of tenants through
the gateway, prints results and measured throughput, and shuts everything down.
"""
from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hmi.client import HMIClient
from hmi.progress import BuildBars, TrainBar
from hmi.launcher import ServiceSet

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "demo_corpus.txt"
SST2 = REPO.parent / "shared" / "datasets" / "sst2"   # labeled data beside the checkout, when present
REVIEWS = ["a gripping , beautifully acted film", "the plot is dull and the jokes fall flat",
           "one of the best movies of the year", "a tedious mess from start to finish"]
TASKS = [
    ("sentiment", ["negative", "positive"]),
    ("topic", ["support", "review", "news", "other"]),
    ("urgency", ["low", "medium", "high"]),
]
SAMPLES = [
    "The service was friendly and the food arrived quickly.",
    "I would like to cancel my order and get a refund.",
    "Heavy rain is expected across the region tomorrow morning.",
    "This phone stopped working after two days, very disappointing.",
    "Thank you for your help with my account yesterday.",
    "The new album is a bold step forward for the band.",
]


def zipf_choice(rng: random.Random, n: int, alpha: float = 1.0) -> int:
    weights = [1.0 / (rank + 1) ** alpha for rank in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def run_demo(args) -> int:
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="hmi-demo-"))
    services = ServiceSet.on_free_ports(data_dir, log_dir=data_dir / "logs")
    print(f"starting store, compute and gateway (data and logs in {data_dir}) ...", flush=True)
    started = time.perf_counter()
    services.start()
    print(f"services ready in {time.perf_counter() - started:.1f}s: gateway {services.gateway_addr}", flush=True)
    try:
        with HMIClient(services.gateway_addr, timeout=120) as client:
            _run(client, args)
    finally:
        services.stop()
        print("services stopped", flush=True)
    return 0


def _run(client: HMIClient, args) -> None:
    from tqdm import tqdm

    corpus = CORPUS.read_text(encoding="utf-8")
    print(f"\nbuilding PLOT of domain 'demo' from {CORPUS.name} ({len(corpus.splitlines())} lines), "
          f"split layer 2, context 3 ...", flush=True)
    progress = BuildBars(sys.stdout, prefix="  ")
    domain = client.build_domain("demo", corpus, split_layer=2, context=3, min_count=2, progress=progress)
    progress.close()
    print(f"  {domain.nodes} knowledge-tree nodes (per depth {list(domain.nodes_per_depth)}), "
          f"{domain.plot_bytes / 2**20:.1f} MiB of fp16 vectors")

    print(f"\nregistering {args.tenants} tenants, each with its own random LoRA adapter and head ...", flush=True)
    tenants: list[tuple[str, list[str]]] = []
    for index in tqdm(range(args.tenants), desc="  tenants", file=sys.stdout):
        task, labels = TASKS[index % len(TASKS)]
        tenant_id = f"{task}-{index:04d}"
        client.register_tenant(tenant_id, "demo", labels, seed=index + 1)
        tenants.append((tenant_id, labels))

    print("\na few results (random adapters: labels are arbitrary but each tenant answers differently):")
    for tenant_id, _ in tenants[:3]:
        for text, prediction in zip(SAMPLES[:2], client.classify(tenant_id, SAMPLES[:2])):
            probabilities = ", ".join(f"{k}={v:.2f}" for k, v in prediction.probabilities.items())
            print(f"  {tenant_id:16s} {prediction.label:9s} [{probabilities}]  {text}")

    if args.trained and (SST2 / "train.jsonl").exists():
        _trained_tenant(client, args)

    rng = random.Random(7)
    lines = [line for line in corpus.splitlines() if line.strip()]
    requests = [(tenants[zipf_choice(rng, len(tenants))][0], [rng.choice(lines)]) for _ in range(args.requests)]
    print(f"\nsending {len(requests)} classify requests for a Zipf mix of tenants from {args.clients} "
          f"concurrent clients ...", flush=True)

    def call(item):
        begin = time.perf_counter()
        client.classify(*item)
        return time.perf_counter() - begin

    for warm in requests[:8]:
        call(warm)
    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        latencies = list(pool.map(call, requests))
    elapsed = time.perf_counter() - begin
    latencies.sort()
    distinct = len({tenant for tenant, _ in requests})
    print(f"  {len(requests)} requests for {distinct} distinct tenants in {elapsed:.2f}s: "
          f"{len(requests) / elapsed:.1f} requests/s, latency p50 {statistics.median(latencies) * 1e3:.1f} ms, "
          f"p99 {latencies[int(0.99 * (len(latencies) - 1))] * 1e3:.1f} ms")


def _trained_tenant(client: HMIClient, args) -> None:
    """A real tenant: PLOT of movie-review text, adapter and head trained on SST-2 sentiment labels."""
    import json

    from services.common.models import packaged_minilm_dir
    from services.training.tenant_training import train_tenant

    lines = [json.loads(line)["text"] for line in (SST2 / "train.jsonl").read_text().splitlines()[-args.corpus_lines:]]
    print(f"\nbuilding domain 'movies' from {len(lines)} SST-2 review snippets and training tenant 'movie-critic' "
          f"on {args.train_examples} labeled ones ...", flush=True)
    client.build_domain("movies", "\n".join(lines), split_layer=2, context=3, min_count=2)
    progress = TrainBar(sys.stdout, desc="  training")
    report = train_tenant(client, packaged_minilm_dir(), "movies", SST2 / "train.jsonl", SST2 / "validation.jsonl",
                          ["negative", "positive"], epochs=2, max_train=args.train_examples, progress=progress)
    progress.close()
    client.register_tenant("movie-critic", "movies", report.labels, report.adapter)
    print(f"  eval accuracy on the {report.eval_examples} SST-2 validation sentences: {report.eval_accuracy:.3f}")
    for review, prediction in zip(REVIEWS, client.classify("movie-critic", REVIEWS)):
        print(f"  movie-critic     {prediction.label:9s} p={prediction.probabilities[prediction.label]:.2f}  {review}")
