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
3. int8 KV against fp32: the running count at the same budget (`--kv-dtypes`), held-out perplexity of the base
   model through the serving path (prompt log-probabilities of `--ppl-texts` texts of `--heldout` cut to
   `--ppl-tokens` tokens: every token attends to rounded keys and values), and greedy continuations of demo
   sentences compared token by token.
4. A KV budget (H2O: heavy hitters by accumulated attention plus a recent window) on long prompts: documents of
   `--budget-prompt` tokens (consecutive held-out abstracts joined) are prefilled whole, then the next
   `--budget-continuation` tokens of each are fed one per step (forced) while the cache keeps `--budgets`
   (fractions of the prompt); the perplexity of those tokens against the budget.
5. The host tier: `--probes` conversations of a `--system-tokens` history each, on a pool of `--host-pool-mib`
   that two other tenants' prompts of the same length churn between a conversation's turns; the next turn's
   time to first token with `--kv-host-mib` of host tier against none (the history computed again).

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

DEFAULT_HELDOUT = ROOT.parent / "shared" / "datasets" / "medical_abstracts" / "validation.jsonl"


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


def concurrency(model: DecoderModel, tokenizer, eos: tuple[int, ...], args, kv_dtype: str = "float32") -> dict:
    texts = load_texts(DEMO_CORPUS)
    rng = np.random.default_rng(0)
    prompts = [tokenizer.encode(texts[int(i)]).ids for i in rng.integers(0, len(texts), size=args.requests)]
    per_token = cache_bytes_per_token(model.dims, model.dims.layers)
    reservations = [(len(p) + args.max_new_tokens) * per_token for p in prompts]
    budget = args.kv_mib << 20
    # What admission by whole reservations ran at most: the first requests whose reservations fit together.
    reserved_concurrency = int(np.searchsorted(np.cumsum(reservations), budget, side="right"))
    engine = engine_for(model, args.kv_mib, tenants=8, max_running=args.requests, kv_dtype=kv_dtype)
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
    return {"kv_dtype": kv_dtype, "kv_mib": args.kv_mib, "requests": args.requests,
            "max_new_tokens": args.max_new_tokens,
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


def host_tier_ttft(model: DecoderModel, tokenizer, args) -> dict:
    """Each conversation's second turn after other tenants pushed its first turn's blocks out of the pool."""
    ids = tokenizer.encode(" ".join(load_texts(DEMO_CORPUS))).ids
    size = args.system_tokens

    def history(i: int) -> list[int]:
        return (ids[i * 97:] + ids)[:size]       # a different history per conversation

    question = tokenizer.encode(" And what comes next?").ids
    runs = {}
    for host_mib in (0, args.kv_host_mib):
        engine = engine_for(model, args.host_pool_mib, tenants=args.probes + 2, kv_host_bytes=host_mib << 20)
        turns = []
        try:
            first_token_seconds(engine, "t0", question)                    # warm-up
            for i in range(args.probes):
                first_token_seconds(engine, f"t{i}", history(i))
                for churn in range(2):                                     # other tenants fill the pool
                    first_token_seconds(engine, f"t{args.probes + churn}", history(args.probes + 2 * i + churn))
                turns.append(first_token_seconds(engine, f"t{i}", history(i) + question))
            stats = engine.snapshot()
        finally:
            engine.close()
        runs[host_mib] = {"next_turn_ms": [1000 * s for s in turns], "median_ms": 1000 * statistics.median(turns),
                          "swapped_in": stats.swapped_in, "swapped_out": stats.swapped_out,
                          "prefix_hit_tokens": stats.prefix_hits}
    without, with_host = runs[0], runs[args.kv_host_mib]
    return {"history_tokens": size, "probes": args.probes, "pool_mib": args.host_pool_mib,
            "host_mib": args.kv_host_mib, "without": without, "with_host": with_host,
            "speedup": without["median_ms"] / with_host["median_ms"]}


def perplexity(engine: GenerationEngine, prompts: list[list[int]]) -> float:
    """exp(mean NLL) of every prompt token after the first, as the engine scores them (prompt log-probabilities)."""
    streams = [engine.submit(GenerationRequest("t0", 1, "", 0, np.asarray(p),
                                               SamplingParams(max_new_tokens=1, prompt_logprobs=True)))
               for p in prompts]
    total, count = 0.0, 0
    for stream in streams:
        for _token, details in stream.with_details():
            for found in details.prompt_logprobs or ():
                total -= found.logprob
                count += 1
    return float(np.exp(total / count))


def greedy(engine: GenerationEngine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens)
    streams = [engine.submit(GenerationRequest("t0", 1, "", 0, np.asarray(p), params)) for p in prompts]
    return [list(stream) for stream in streams]


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[int, float]:
    """How many continuations are identical, and the mean count of tokens before the first difference."""
    common = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(reference, other)]
    return sum(a == b for a, b in zip(reference, other)), float(np.mean(common))


def int8_quality(model: DecoderModel, tokenizer, args) -> dict:
    texts = load_texts(args.heldout)[:args.ppl_texts]
    scored = [tokenizer.encode(t).ids[:args.ppl_tokens] for t in texts]
    sentences = load_texts(DEMO_CORPUS)[:args.greedy_prompts]
    prompts = [tokenizer.encode(t).ids for t in sentences]
    found: dict[str, dict] = {}
    for kv_dtype in ("float32", "int8"):
        engine = engine_for(model, 512, tenants=1, prefix_caching=False, kv_dtype=kv_dtype)
        try:
            started = time.monotonic()
            found[kv_dtype] = {"perplexity": perplexity(engine, scored),
                               "greedy": greedy(engine, prompts, args.greedy_tokens),
                               "seconds": time.monotonic() - started}
        finally:
            engine.close()
    identical, common = greedy_agreement(found["float32"]["greedy"], found["int8"]["greedy"])
    return {"heldout": str(args.heldout), "texts": len(scored), "tokens": int(sum(len(s) for s in scored)),
            "perplexity_float32": found["float32"]["perplexity"], "perplexity_int8": found["int8"]["perplexity"],
            "perplexity_change": found["int8"]["perplexity"] / found["float32"]["perplexity"] - 1,
            "greedy_prompts": len(prompts), "greedy_tokens": args.greedy_tokens,
            "greedy_identical": identical, "greedy_common_prefix_mean": common}


def budget_perplexity(model: DecoderModel, tokenizer, args) -> dict:
    stream = [t for text in load_texts(args.heldout) for t in tokenizer.encode(" " + text).ids]
    length = args.budget_prompt + args.budget_continuation
    documents = [stream[i * length:(i + 1) * length] for i in range(args.budget_documents)]
    if len(documents[-1]) < length:
        raise SystemExit(f"{args.heldout} holds too few tokens for {args.budget_documents} documents of {length}")
    rows = []
    for fraction in [0.0] + [float(f) for f in args.budgets.split(",")]:
        budget = int(round(fraction * args.budget_prompt))
        engine = engine_for(model, 1024, tenants=1, prefix_caching=False)
        started = time.monotonic()
        try:
            streams = [engine.submit(GenerationRequest(
                "t0", 1, "", 0, np.asarray(d[:args.budget_prompt]),
                SamplingParams(max_new_tokens=args.budget_continuation, logprobs=True, kv_budget=budget,
                               forced_tokens=tuple(d[args.budget_prompt:])))) for d in documents]
            logprobs = [details.logprob.logprob for s in streams for _token, details in s.with_details()]
        finally:
            engine.close()
        rows.append({"budget_fraction": fraction, "budget_tokens": budget,
                     "perplexity": float(np.exp(-np.mean(logprobs))), "seconds": time.monotonic() - started})
    full = rows[0]["perplexity"]
    for row in rows:
        row["change"] = row["perplexity"] / full - 1
    return {"documents": len(documents), "prompt_tokens": args.budget_prompt,
            "continuation_tokens": args.budget_continuation, "rows": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs, p = result["concurrency"], result["prefix"]
    c = runs[0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels, heights, colours = ["whole\nreservation"], [c["reserved_concurrency"]], ["grey"]
    for run in runs:
        labels += [f"paged {run['kv_dtype']}\nmedian", f"paged {run['kv_dtype']}\npeak"]
        heights += [run["paged_median"], run["paged_peak"]]
        colours += ["tab:blue" if run["kv_dtype"] == "float32" else "tab:orange"] * 2
    left.bar(labels, heights, color=colours)
    left.tick_params(axis="x", labelsize=8)
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
    parser.add_argument("--kv-dtypes", default="float32,int8", help="pools the concurrency part runs")
    parser.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT)
    parser.add_argument("--ppl-texts", type=int, default=32)
    parser.add_argument("--ppl-tokens", type=int, default=256)
    parser.add_argument("--greedy-prompts", type=int, default=16)
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--budget-prompt", type=int, default=1024)
    parser.add_argument("--budget-continuation", type=int, default=128)
    parser.add_argument("--budget-documents", type=int, default=4)
    parser.add_argument("--budgets", default="0.5,0.25,0.125", help="KV budgets as fractions of the prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--host-pool-mib", type=int, default=40, help="the pool of the host-tier part")
    parser.add_argument("--kv-host-mib", type=int, default=256, help="its host tier")
    parser.add_argument("--skip", choices=["concurrency", "prefix", "int8", "budget", "host"], action="append",
                        default=[])
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
        runs = result["concurrency"] = [concurrency(model, tokenizer, eos, args, kv_dtype)
                                        for kv_dtype in args.kv_dtypes.split(",")]
        c = runs[0]
        print(f"\n| KV {c['kv_mib']} MiB, {c['requests']} requests, max_new_tokens {c['max_new_tokens']}, "
              f"prompts {c['prompt_tokens_mean']:.1f} tokens | sequences running, median over {c['seconds']:.0f} s "
              f"| peak | preemptions | tokens/s |\n| --- | ---: | ---: | ---: | ---: |")
        print(f"| whole reservation (prompt + max new tokens, fp32) admitted | {c['reserved_concurrency']} | | | |")
        for run in runs:
            print(f"| paged, {run['kv_dtype']} | {run['paged_median']:.0f} | {run['paged_peak']} | "
                  f"{run['preemptions']} | {run['tokens_per_s']:.1f} |")
    if "prefix" not in args.skip:
        p = result["prefix"] = prefix_ttft(model, tokenizer, args)
        print(f"\n| {p['system_tokens']}-token system prompt, {p['probes']} tenants | time to first token, median |"
              f"\n| --- | ---: |")
        print(f"| miss (system prompt prefilled) | {p['miss_median_ms']:.0f} ms |")
        print(f"| hit (its full blocks from the prefix cache) | {p['hit_median_ms']:.0f} ms |")
        print(f"speed-up {p['speedup']:.1f}x; prefix cache: {p['prefix_hit_tokens']} of {p['prefix_query_tokens']} "
              f"prompt tokens found")
    if "int8" not in args.skip:
        q = result["int8"] = int8_quality(model, tokenizer, args)
        print(f"\n| KV dtype | held-out perplexity ({q['texts']} texts, {q['tokens']} tokens) |\n| --- | ---: |")
        print(f"| float32 | {q['perplexity_float32']:.4f} |\n| int8 | {q['perplexity_int8']:.4f} "
              f"({100 * q['perplexity_change']:+.2f} %) |")
        print(f"greedy, {q['greedy_prompts']} prompts x {q['greedy_tokens']} tokens: {q['greedy_identical']} "
              f"identical, {q['greedy_common_prefix_mean']:.1f} tokens before the first difference on average")
    if "budget" not in args.skip:
        b = result["budget"] = budget_perplexity(model, tokenizer, args)
        print(f"\n| KV budget ({b['documents']} documents: {b['prompt_tokens']}-token prompts, then "
              f"{b['continuation_tokens']} tokens scored) | kept tokens | perplexity |\n| --- | ---: | ---: |")
        for row in b["rows"]:
            label = "full cache" if not row["budget_tokens"] else f"{100 * row['budget_fraction']:.1f} %"
            print(f"| {label} | {row['budget_tokens'] or 'all'} | {row['perplexity']:.3f} "
                  f"({100 * row['change']:+.2f} %) |")
    if "host" not in args.skip:
        h = result["host"] = host_tier_ttft(model, tokenizer, args)
        print(f"\n| {h['probes']} conversations of {h['history_tokens']} tokens, pool {h['pool_mib']} MiB churned "
              f"between turns | next turn's time to first token, median | blocks copied back |\n| --- | ---: | ---: |")
        print(f"| no host tier (history computed again) | {h['without']['median_ms']:.0f} ms | - |")
        print(f"| host tier {h['host_mib']} MiB | {h['with_host']['median_ms']:.0f} ms | "
              f"{h['with_host']['swapped_in']} |")
        print(f"speed-up {h['speedup']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.plot and "concurrency" in result and "prefix" in result:
        plot(result, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
