"""`hmi demo` (`make demo`): the whole system on this machine in a few minutes.

Starts the three services, builds the demo domain's PLOT from the corpus the repo ships, registers
a few hundred tenants with their own random adapters and heads, trains a few real tenants on two more
domains (movie reviews, biomedical abstracts; when ../shared/datasets is present), classifies a mix of
tenants through the gateway, prints results and measured throughput, then serves a few generative
tenants of the packaged SmolLM2 from the same deployment (streamed text, continuous batching), and shuts
everything down.
"""
from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

from hmi.client import HMIClient
from hmi.launcher import ServiceSet
from hmi.progress import BuildBars, TrainBar

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "demo_corpus.txt"
DATASETS = REPO.parent / "shared" / "datasets"   # labeled data beside the checkout, when present
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


# SmolLM2 tenants run every layer: PLOT saves a decoder of 30 layers little and costs it perplexity
# (docs/accuracy.md), and a chat template's special tokens never occur in a plain-text corpus.
GEN_SPLIT_LAYER = 0
GEN_PROMPTS = ["Write one sentence about the sea.", "Give me a tip for a rainy day.",
               "What is a good name for a cat?"]


def run_demo(args) -> int:
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="hmi-demo-"))
    model = "minilm,smollm2" if args.generate else "minilm"
    # SmolLM2's compute converts its GGUF on a fresh machine (~25 s): the MiniLM part runs meanwhile, and the
    # gateway is ready once MiniLM's compute is.
    services = ServiceSet.on_free_ports(data_dir, log_dir=data_dir / "logs", model=model,
                                        extra_env={"HMI_REQUIRED_MODELS": "minilm"})
    later = ["compute-smollm2"] if args.generate else []
    print(f"starting store, compute and gateway (data and logs in {data_dir}) ...", flush=True)
    started = time.perf_counter()
    services.start(later=later)
    print(f"services ready in {time.perf_counter() - started:.1f}s: gateway {services.gateway_addr}"
          + (" (SmolLM2's compute still loading)" if later else ""), flush=True)
    try:
        with services.client(timeout=120) as client:     # the admin token the launcher made
            _run(client, args, lambda: [services.wait_serving(name, timeout=300) for name in later])
    finally:
        services.stop()
        print("services stopped", flush=True)
    return 0


def _run(client: HMIClient, args, generation_ready: Callable[[], object]) -> None:
    from tqdm import tqdm

    corpus = CORPUS.read_text(encoding="utf-8")
    print(f"\nbuilding PLOT of domain 'demo' from {CORPUS.name} ({len(corpus.splitlines())} lines) at the "
          f"recommended setting (split layer, context and domain bridge: the model's defaults) ...", flush=True)
    progress = BuildBars(sys.stdout, prefix="  ")
    domain = client.build_domain("demo", corpus, min_count=2, progress=progress, bridge_steps=args.bridge_steps)
    progress.close()
    print(f"  split layer {domain.spec.split_layer}, context {domain.spec.context}: {domain.nodes} knowledge-tree "
          f"nodes (per depth {list(domain.nodes_per_depth)}), {domain.plot_bytes / 2**20:.1f} MiB of fp16 vectors")
    if domain.HasField("bridge"):
        print(f"  domain bridge: held-out error {domain.bridge.loss_before:.4f} -> {domain.bridge.loss_after:.4f} "
              f"in {domain.bridge.steps} steps")

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

    if args.trained:
        _trained_tenants(client, args, Path(tempfile.mkdtemp(prefix="hmi-demo-data-")))

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

    if args.generate:
        generation_ready()
        _generative_tenants(client, args)


def _generative_tenants(client: HMIClient, args) -> None:
    """SmolLM2 tenants beside the MiniLM ones, served by the same gateway; prompts generated together."""
    print("\ncreating domain 'stories' for smollm2 (split layer 0: every layer in compute) ...", flush=True)
    client.build_domain("stories", "", split_layer=GEN_SPLIT_LAYER, context=1, min_count=1, model="smollm2")
    writers = [f"writer-{i}" for i in range(1, len(GEN_PROMPTS) + 1)]
    for index, tenant_id in enumerate(writers):
        client.register_tenant(tenant_id, "stories", [], rank=4, seed=100 + index, model="smollm2")
    print(f"registered {len(writers)} generative tenants with random adapters; generating for all at once "
          f"(continuous batching, {args.new_tokens} new tokens each) ...", flush=True)

    def generate(item):
        """Retried while the gateway has not yet seen SmolLM2's compute answer (it probes every second)."""
        deadline = time.monotonic() + 15
        while True:
            try:
                return generate_once(item)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def generate_once(item):
        tenant_id, prompt = item
        chat = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        begin, first, text, tokens = time.perf_counter(), None, "", 0
        for message in client.generate(tenant_id, chat, max_new_tokens=args.new_tokens, seed=1):
            if message.token_ids and first is None:
                first = time.perf_counter() - begin
            text += message.text
            tokens += len(message.token_ids)
        return tenant_id, prompt, " ".join(text.split()), tokens, first or 0.0

    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(writers)) as pool:
        results = list(pool.map(generate, zip(writers, GEN_PROMPTS)))
    elapsed = time.perf_counter() - begin
    for tenant_id, prompt, text, tokens, first in results:
        print(f"  {tenant_id}: {prompt}\n    -> {text}  [{tokens} tokens, first after {first * 1e3:.0f} ms]")
    total = sum(r[3] for r in results)
    print(f"  {total} tokens for {len(results)} tenants in {elapsed:.2f}s: {total / elapsed:.1f} tokens/s")


@dataclass
class DemoTenant:
    """A real demo tenant: a labeled data set beside the checkout, its domain, and how to relabel it."""
    tenant_id: str
    domain: str
    data: Path
    task: str
    share: float = 1.0                                  # of --train-examples
    corpus_share: float = 1.0                           # of --corpus-lines and --bridge-steps for its domain
    relabel: Callable[[str], str] | None = None


TRAINED = [
    DemoTenant("movie-critic", "movies", DATASETS / "sst2", "sentiment of a movie review"),
    # Abstracts are ~10x longer than movie reviews: a third as many lines keeps the two builds' cost comparable.
    DemoTenant("clinic-topics", "biomed", DATASETS / "medical_abstracts", "disease area of an abstract", share=0.4,
               corpus_share=0.3),
    DemoTenant("cardio-screen", "biomed", DATASETS / "medical_abstracts", "cardiovascular or not", share=0.4,
               corpus_share=0.3,
               relabel=lambda label: "cardiovascular" if label.startswith("cardiovascular") else "other"),
]


def _trained_tenants(client: HMIClient, args, work_dir: Path) -> None:
    """Real tenants on two domains: PLOT of each domain's text, adapters trained on its labels, then served."""
    from services.common.packaged_models import packaged_minilm_dir
    from training.tenant_training import read_labeled, train_tenant

    available = [t for t in TRAINED if (t.data / "train.jsonl").exists()]
    if not available:
        print(f"\n(no labeled data in {DATASETS}: skipping the trained tenants)")
        return
    built: set[str] = set()
    for tenant in available:
        if tenant.domain not in built:
            lines = max(100, int(args.corpus_lines * tenant.corpus_share))
            texts = [text for text, _ in read_labeled(tenant.data / "train.jsonl")][-lines:]
            print(f"\nbuilding domain '{tenant.domain}' from {len(texts)} texts of {tenant.data.name} ...", flush=True)
            # its share of the bridge's steps too: a step over long abstracts costs ~10x one over reviews
            steps = max(20, int(args.bridge_steps * tenant.corpus_share))
            client.build_domain(tenant.domain, "\n".join(texts), min_count=2, bridge_steps=steps)
            built.add(tenant.domain)
        train, evaluation = (_relabelled(tenant, name, work_dir) for name in ("train.jsonl", "validation.jsonl"))
        examples = max(50, int(args.train_examples * tenant.share))
        print(f"training tenant '{tenant.tenant_id}' ({tenant.task}) on {examples} labeled examples ...", flush=True)
        progress = TrainBar(sys.stdout, desc="  training")
        report = train_tenant(client, packaged_minilm_dir(), tenant.domain, train, evaluation, None, epochs=2,
                              max_train=examples, max_tokens=64, progress=progress)
        progress.close()
        client.register_tenant(tenant.tenant_id, tenant.domain, report.labels, report.adapter)
        print(f"  eval accuracy on {report.eval_examples} held-out examples: {report.eval_accuracy:.3f} "
              f"({len(report.labels)} classes)")
        shown = read_labeled(evaluation, 4)
        predictions = client.classify(tenant.tenant_id, [t for t, _ in shown], truncate=True)
        for (text, truth), prediction in zip(shown, predictions):
            mark = "ok " if prediction.label == truth else "-- "
            print(f"  {mark}{prediction.label:24.24s} p={prediction.probabilities[prediction.label]:.2f}  "
                  f"(true: {truth:.24s})  {text[:60]}")


def _relabelled(tenant: DemoTenant, name: str, work_dir: Path) -> Path:
    import json
    source = tenant.data / name
    if tenant.relabel is None:
        return source
    target = work_dir / f"{tenant.tenant_id}-{name}"
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    target.write_text("\n".join(json.dumps({"text": r["text"], "label": tenant.relabel(r["label"])}) for r in rows))
    return target
