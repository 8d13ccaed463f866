"""The KV study: what paging and prefix caching give a generative tenant, in process (compute's generation engine
with SmolLM2-135M and `hmi bench`'s generative adapters; no services, so only the engine is measured).

1. Concurrency at one KV budget: `--requests` requests of the bench's prompts (demo-corpus sentences) asking for
   `--max-new-tokens` each (1,024: what chat clients and load tools send) are submitted at once. Before paging a
   request was admitted only when its whole reservation (prompt + max new tokens) fitted the budget, so at most
   floor(budget / reservation) ran; with paging, blocks are taken as tokens arrive. The running count is
   sampled every 50 ms for `--seconds`.
2. Time to first token with a shared `--system-tokens` system prompt: each of `--probes` tenants sends the
   system prompt and a question of its own (a miss: the system prompt is prefilled), then the same tenant
   sends it with another question (a hit: the system prompt's full blocks come from the prefix cache).

Prints the tables, writes `--out` (JSON) and a PNG beside it (`--plot`).

    python bench/kv_study.py --out bench/results/kv-study.json --plot docs/kv-study.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hmi.bench.generation_systems import generative_adapter  # noqa: E402
from hmi.bench.workload import DEMO_CORPUS, load_texts  # noqa: E402
from models.decoder import DecoderModel  # noqa: E402
from models.kv_cache import cache_bytes_per_token  # noqa: E402
from models.loading import eos_token_ids, load_tokenizer  # noqa: E402
from services.common.model_specs import resolve_model_dir  # noqa: E402
from services.compute.adapter_pool import AdapterPool  # noqa: E402
from services.compute.generation import GenerationEngine  # noqa: E402
from services.compute.generation_scheduler import GenerationRequest, SamplingParams  # noqa: E402


def engine_for(model: DecoderModel, budget_mib: int, tenants: int, **kwargs) -> GenerationEngine:
    adapters = {f"t{i}": generative_adapter(model.dims, i, 0) for i in range(tenants)}
    pool = AdapterPool(model.dims, model.device, slots=max(8, tenants), max_rank=8, host_cache_bytes=256 << 20,
                       fetch=lambda tenant, version: adapters[tenant])
    return GenerationEngine(model, pool, None, kv_budget_bytes=budget_mib << 20,
                            max_running=kwargs.pop("max_running", 64), max_waiting=1024, **kwargs)


def drain(stream) -> None:
    try:
        for _ in stream:
            pass
    except Exception:  # noqa: BLE001 - the study ends every stream; how they end is not measured
        pass


def concurrency(model: DecoderModel, tokenizer, eos: tuple[int, ...], args) -> dict:
    texts = load_texts(DEMO_CORPUS)
    rng = np.random.default_rng(0)
    prompts = [tokenizer.encode(texts[int(i)]).ids for i in rng.integers(0, len(texts), size=args.requests)]
    per_token = cache_bytes_per_token(model.dims, model.dims.layers)
    reservations = [(len(p) + args.max_new_tokens) * per_token for p in prompts]
    budget = args.kv_mib << 20
    # What admission by whole reservations ran at most: the first requests whose reservations fit together.
    reserved_concurrency = int(np.searchsorted(np.cumsum(reservations), budget, side="right"))
    engine = engine_for(model, args.kv_mib, tenants=8, max_running=args.requests)
    samples: list[int] = []
    try:
        streams = [engine.submit(GenerationRequest(f"t{i % 8}", 1, "", 0, np.asarray(p),
                                                   SamplingParams(max_new_tokens=args.max_new_tokens,
                                                                  stop_token_ids=eos)))
                   for i, p in enumerate(prompts)]
        drained = [threading.Thread(target=drain, args=(s,), daemon=True) for s in streams]
        for thread in drained:
            thread.start()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            samples.append(engine.snapshot().running)
            time.sleep(0.05)
        stats = engine.snapshot()
        for stream in streams:
            stream.cancel()
        for thread in drained:
            thread.join(timeout=30)
    finally:
        engine.close()
    return {"kv_mib": args.kv_mib, "requests": args.requests, "max_new_tokens": args.max_new_tokens,
            "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
            "reserved_concurrency": reserved_concurrency, "paged_peak": max(samples),
            "paged_median": float(statistics.median(samples)), "preemptions": stats.preemptions,
            "generated_tokens": stats.tokens_generated, "seconds": args.seconds,
            "tokens_per_s": stats.tokens_generated / args.seconds}


def first_token_seconds(engine: GenerationEngine, tenant: str, prompt: list[int]) -> float:
    stream = engine.submit(GenerationRequest(tenant, 1, "", 0, np.asarray(prompt), SamplingParams(max_new_tokens=1)))
    started = time.monotonic()
    list(stream)
    return stream.first_token_at - started


def prefix_ttft(model: DecoderModel, tokenizer, args) -> dict:
    text = " ".join(load_texts(DEMO_CORPUS))
    system = tokenizer.encode(text).ids[:args.system_tokens]
    questions = [tokenizer.encode(f" Question {i}: what does the text above say about item {i}?").ids
                 for i in range(2 * args.probes)]
    engine = engine_for(model, 512, tenants=args.probes)
    misses, hits = [], []
    try:
        first_token_seconds(engine, "t0", questions[0])                    # warm-up: adapter fetch, allocator
        for i in range(args.probes):
            misses.append(first_token_seconds(engine, f"t{i}", system + questions[2 * i]))
            hits.append(first_token_seconds(engine, f"t{i}", system + questions[2 * i + 1]))
        stats = engine.snapshot()
    finally:
        engine.close()
    return {"system_tokens": len(system), "probes": args.probes, "miss_ms": [1000 * s for s in misses],
            "hit_ms": [1000 * s for s in hits], "miss_median_ms": 1000 * statistics.median(misses),
            "hit_median_ms": 1000 * statistics.median(hits),
            "speedup": statistics.median(misses) / statistics.median(hits),
            "prefix_hit_tokens": stats.prefix_hits, "prefix_query_tokens": stats.prefix_queries}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c, p = result["concurrency"], result["prefix"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(["whole reservation", "paged: median", "paged: peak"],
             [c["reserved_concurrency"], c["paged_median"], c["paged_peak"]], color=["grey", "tab:blue", "tab:blue"])
    left.set_title(f"sequences running at {c['kv_mib']} MiB of KV\n(max_new_tokens {c['max_new_tokens']})")
    left.set_ylabel("sequences")
    right.bar(["miss", "prefix hit"], [p["miss_median_ms"], p["hit_median_ms"]], color=["grey", "tab:green"])
    right.set_title(f"time to first token, {p['system_tokens']}-token system prompt")
    right.set_ylabel("ms (median)")
    figure.suptitle(result["machine"], fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--kv-mib", type=int, default=256)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--skip", choices=["concurrency", "prefix"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv-study.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    model = DecoderModel(model_dir, torch.device("cpu"))
    tokenizer, eos = load_tokenizer(model_dir), tuple(eos_token_ids(model_dir))
    import platform
    result = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}", "model": args.model}
    if "concurrency" not in args.skip:
        c = result["concurrency"] = concurrency(model, tokenizer, eos, args)
        print(f"\n| KV {c['kv_mib']} MiB, {c['requests']} requests, max_new_tokens {c['max_new_tokens']}, "
              f"prompts {c['prompt_tokens_mean']:.1f} tokens | sequences running |\n| --- | ---: |")
        print(f"| whole reservation (prompt + max new tokens) admitted | {c['reserved_concurrency']} |")
        print(f"| paged, median over {c['seconds']:.0f} s | {c['paged_median']:.0f} |")
        print(f"| paged, peak | {c['paged_peak']} |")
        print(f"preemptions {c['preemptions']}, {c['generated_tokens']} tokens generated "
              f"({c['tokens_per_s']:.1f} tokens/s)")
    if "prefix" not in args.skip:
        p = result["prefix"] = prefix_ttft(model, tokenizer, args)
        print(f"\n| {p['system_tokens']}-token system prompt, {p['probes']} tenants | time to first token, median |"
              f"\n| --- | ---: |")
        print(f"| miss (system prompt prefilled) | {p['miss_median_ms']:.0f} ms |")
        print(f"| hit (its full blocks from the prefix cache) | {p['hit_median_ms']:.0f} ms |")
        print(f"speed-up {p['speedup']:.1f}x; prefix cache: {p['prefix_hit_tokens']} of {p['prefix_query_tokens']} "
              f"prompt tokens found")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.plot and "concurrency" in result and "prefix" in result:
        plot(result, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
