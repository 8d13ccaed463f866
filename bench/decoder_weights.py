"""What a bfloat16 copy of a decoder's shared weights costs and gives (compute's `--decoder-weights`), in process:
compute's generation engine with SmolLM2-135M and `hmi bench`'s generative adapters, float32 then bfloat16.

- decode step time with `--sequences` sequences decoding together (the median over the steps in which every
  sequence fed one token), on compute's one torch thread by default;
- held-out perplexity of the base model through the serving path (prompt log-probabilities of `--ppl-texts`
  texts of `--heldout`, cut to `--ppl-tokens` tokens);
- greedy continuations of `--greedy-prompts` demo sentences, compared token by token with float32.

    python bench/decoder_weights.py --out bench/results/decoder-weights.json --plot docs/decoder-weights.png
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.kv_study import DEFAULT_HELDOUT, engine_for, greedy, greedy_agreement, perplexity  # noqa: E402
from hmi.bench.workload import DEMO_CORPUS, load_texts  # noqa: E402
from models.decoder import DecoderModel  # noqa: E402
from models.loading import load_tokenizer  # noqa: E402
from services.common.model_specs import resolve_model_dir  # noqa: E402
from services.compute.generation_scheduler import GenerationRequest, SamplingParams  # noqa: E402


def decode_step_ms(engine, sequences: int, vocab: int) -> float:
    """Median time of the engine's steps in which all `sequences` sequences decode one token each."""
    times: list[float] = []
    step = engine.runner.step

    def timed(plan):
        started = time.perf_counter()
        out = step(plan)
        if len(plan.sequences) == sum(plan.feeds.values()) >= sequences:
            times.append(time.perf_counter() - started)
        return out
    engine.runner.step = timed
    rng = np.random.default_rng(0)
    streams = [engine.submit(GenerationRequest(f"t{i % 8}", 1, "", 0, rng.integers(100, vocab, size=15),
                                               SamplingParams(max_new_tokens=32))) for i in range(sequences)]
    for stream in streams:
        list(stream)
    engine.runner.step = step
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--heldout", type=Path, default=DEFAULT_HELDOUT)
    parser.add_argument("--ppl-texts", type=int, default=32)
    parser.add_argument("--ppl-tokens", type=int, default=256)
    parser.add_argument("--greedy-prompts", type=int, default=16)
    parser.add_argument("--greedy-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (compute runs one on 2 cores)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decoder-weights.json")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    scored = [tokenizer.encode(t).ids[:args.ppl_tokens] for t in load_texts(args.heldout)[:args.ppl_texts]]
    prompts = [tokenizer.encode(t).ids for t in load_texts(DEMO_CORPUS)[:args.greedy_prompts]]
    rows = {}
    for weights in ("float32", "bfloat16"):
        model = DecoderModel(model_dir, torch.device("cpu"), weights=weights)
        engine = engine_for(model, 512, tenants=8, prefix_caching=False)
        try:
            rows[weights] = {"decode_step_ms": decode_step_ms(engine, args.sequences, model.dims.vocab),
                             "perplexity": perplexity(engine, scored),
                             "greedy": greedy(engine, prompts, args.greedy_tokens)}
        finally:
            engine.close()
        print(f"{weights}: decode step {rows[weights]['decode_step_ms']:.1f} ms, "
              f"perplexity {rows[weights]['perplexity']:.4f}", flush=True)
    exact, rounded = rows["float32"], rows["bfloat16"]
    identical, common = greedy_agreement(exact["greedy"], rounded["greedy"])
    result = {"machine": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}, "
                         f"{time.strftime('%Y-%m-%d')}",
              "sequences": args.sequences, "heldout": str(args.heldout), "texts": len(scored),
              "tokens": int(sum(len(s) for s in scored)),
              "float32": {k: v for k, v in exact.items() if k != "greedy"},
              "bfloat16": {k: v for k, v in rounded.items() if k != "greedy"},
              "speedup": exact["decode_step_ms"] / rounded["decode_step_ms"],
              "perplexity_change": rounded["perplexity"] / exact["perplexity"] - 1,
              "greedy_identical": identical, "greedy_prompts": len(prompts), "greedy_tokens": args.greedy_tokens,
              "greedy_common_prefix_mean": common}
    print(f"\n| shared weights | decode step, {args.sequences} sequences | held-out perplexity ({len(scored)} texts) |"
          f"\n| --- | ---: | ---: |")
    print(f"| float32 | {exact['decode_step_ms']:.1f} ms | {exact['perplexity']:.4f} |")
    print(f"| bfloat16 | {rounded['decode_step_ms']:.1f} ms ({result['speedup']:.2f}x faster) | "
          f"{rounded['perplexity']:.4f} ({100 * result['perplexity_change']:+.2f} %) |")
    print(f"greedy: {identical} of {len(prompts)} continuations of {args.greedy_tokens} tokens identical, "
          f"{common:.1f} tokens before the first difference on average")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
        left.bar(["float32", "bfloat16"], [exact["decode_step_ms"], rounded["decode_step_ms"]],
                 color=["grey", "tab:purple"])
        left.set_title(f"decode step, {args.sequences} sequences (ms)")
        right.bar(["float32", "bfloat16"], [exact["perplexity"], rounded["perplexity"]], color=["grey", "tab:purple"])
        right.set_title("held-out perplexity")
        figure.suptitle(result["machine"], fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
