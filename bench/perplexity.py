"""Perplexity study for generative tenants: full model + LoRA against hPLM (PLOT + upper layers + LoRA).

    python bench/perplexity.py --data ../shared/datasets/medical_abstracts [--model smollm2]
                               [--split-layers 0,1,2,4] [--context 1] [--methods plot,distill] --out FILE.json

Texts come from FOLDER/train.jsonl and validation.jsonl ({"text"} per line; labels ignored). For each split
layer L, a domain's PLOT is built from the training texts with the real store code (L = 0: none, the
reference), a tenant's LoRA is trained on causal language modelling with the trainer `hmi tenant train`
uses, on the inputs serving sees, and the held-out perplexity is measured before (base model alone, same
inputs) and after training. Prints a table, writes FILE.json and a PNG beside it. Runs in process.

Methods at L > 0: `plot` (the PLOT rows alone, what `hmi domain build` builds for a decoder) and `distill`
(the same PLOT plus a domain LoRA on the upper layers distilled from the full model on the corpus,
bench/decoder_distillation.py; tenants train on top of it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.accuracy import LocalPlot, parse_list  # noqa: E402
from bench.decoder_distillation import DistillPair, corrected_model, distill_domain_lora  # noqa: E402
from models.decoder import DecoderModel  # noqa: E402
from models.loading import load_tokenizer  # noqa: E402
from services.common.model_specs import model_name, resolve_model_dir  # noqa: E402
from services.knowledge_store.store import KnowledgeStore, StoreSettings  # noqa: E402
from training.causal_trainer import CausalTrainer, CausalTrainSettings  # noqa: E402
from training.tenant_training import build_text_examples, read_texts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--split-layers", default="0,1,2,4", help="0 = the full model + LoRA reference")
    parser.add_argument("--context", type=int, default=1, help="PLOT context depth k")
    parser.add_argument("--train-texts", type=int, default=400)
    parser.add_argument("--eval-texts", type=int, default=100)
    parser.add_argument("--corpus-texts", type=int, default=4000, help="training texts the PLOT is built from")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="plot", help="comma-separated of plot, distill (L > 0)")
    parser.add_argument("--distill-texts", type=int, default=800,
                        help="training texts after the PLOT corpus that the domain LoRA is distilled on")
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--distill-rank", type=int, default=8)
    parser.add_argument("--distill-learning-rate", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    methods_at_split = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods_at_split) - {"plot", "distill"})
    if unknown or not methods_at_split:
        parser.error(f"--methods takes plot and/or distill, not {','.join(unknown) or 'nothing'}")

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    texts = read_texts(args.data / "train.jsonl", args.corpus_texts + args.distill_texts)
    corpus, distill_texts = texts[:args.corpus_texts], texts[args.corpus_texts:]
    train_texts = corpus[:args.train_texts]
    eval_texts = read_texts(args.data / "validation.jsonl", args.eval_texts)
    model = DecoderModel(model_dir, torch.device("cpu"))
    report = {"model": model_name(args.model), "data": str(args.data), "machine": f"{platform.machine()}",
              "settings": {k: str(v) for k, v in vars(args).items()}, "results": []}
    with tempfile.TemporaryDirectory(prefix="hmi-ppl-") as folder:
        store = KnowledgeStore(StoreSettings(Path(folder), model_dir, model_name(args.model), map_size=32 << 30,
                                             default_learn_threshold=-1))
        plot = LocalPlot(store)
        try:
            for split_layer in parse_list(args.split_layers):
                started = time.perf_counter()
                domain, plot_bytes = "", 0
                if split_layer > 0:
                    domain = f"d{split_layer}"
                    record = store.build_domain(domain, "\n".join(corpus), split_layer=split_layer,
                                                context=args.context, min_count=2)
                    plot_bytes = record.plot_bytes
                train = build_text_examples(plot, tokenizer, domain, split_layer, train_texts, args.max_tokens)
                evaluation = build_text_examples(plot, tokenizer, domain, split_layer, eval_texts, args.max_tokens)
                methods = methods_at_split if split_layer else ["full"]
                for method in methods:
                    row = {"split_layer": split_layer, "context": args.context if split_layer else 0,
                           "method": method, "plot_bytes": plot_bytes,
                           "layers_computed": (model.dims.layers - split_layer) / model.dims.layers}
                    served = model
                    if method == "distill":
                        served, distilled = distilled_model(model, plot, tokenizer, domain, split_layer,
                                                            distill_texts, args)
                        row.update(distilled)
                    built = time.perf_counter()
                    trainer = CausalTrainer(served, CausalTrainSettings(
                        split_layer=split_layer, rank=args.rank, alpha=2.0 * args.rank, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, seed=args.seed, epochs=1000, max_steps=args.steps))
                    base = trainer.perplexity(evaluation, with_adapter=False)
                    trainer.fit(train)
                    tuned = trainer.perplexity(evaluation)
                    row.update({"base_perplexity": base, "perplexity": tuned, "build_seconds": built - started,
                                "train_seconds": time.perf_counter() - built})
                    report["results"].append(row)
                    print(f"L={split_layer:2d} {method:8s} base ppl {base:8.2f}  tenant ppl {tuned:8.2f}  "
                          f"PLOT {plot_bytes / 2**20:6.1f} MiB  ({row['train_seconds']:.0f}s)", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(report, indent=2))
                    started = time.perf_counter()
        finally:
            store.close()
    plot_results(report, args.out.with_suffix(".png"))
    return 0


def distilled_model(model: DecoderModel, plot: LocalPlot, tokenizer, domain: str, split_layer: int,
                    texts: list[str], args: argparse.Namespace) -> tuple[DecoderModel, dict]:
    """The domain LoRA distilled on texts outside the PLOT corpus (so that their rows are as inexact as a new
    text's; the last 10 % held out for the KL), merged into a copy of the model."""
    if len(texts) < 16:
        raise SystemExit(f"--methods distill needs at least 16 training texts after the {args.corpus_texts} of the "
                         f"PLOT corpus; {len(texts)} are left")
    held = max(8, len(texts) // 10)
    teacher = build_text_examples(plot, tokenizer, "", 0, texts, args.max_tokens)
    student = build_text_examples(plot, tokenizer, domain, split_layer, texts, args.max_tokens)
    pairs = [DistillPair(t, s) for t, s in zip(teacher, student)]
    started = time.perf_counter()

    def report(step: int, total: int, loss: float) -> None:
        if step % 25 == 0 or step == total:
            print(f"   distill step {step}/{total}: KL {loss:.4f}", flush=True)

    result = distill_domain_lora(model, split_layer, pairs[:-held], pairs[-held:], rank=args.distill_rank,
                                 steps=args.distill_steps, batch_size=args.batch_size,
                                 learning_rate=args.distill_learning_rate, seed=args.seed, progress=report)
    print(f"   domain LoRA: held-out KL {result.kl_before:.4f} -> {result.kl_after:.4f} nats/token "
          f"({time.perf_counter() - started:.0f}s)", flush=True)
    return corrected_model(model, result.adapter), {
        "distill_kl_before": result.kl_before, "distill_kl_after": result.kl_after,
        "distill_steps": result.steps, "distill_seconds": time.perf_counter() - started}


def plot_results(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(report["results"], key=lambda r: (r["split_layer"], r.get("method") == "distill"))
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 3.6))
    labels = [(f"L={r['split_layer']}" + ("\n+domain LoRA" if r.get("method") == "distill" else ""))
              if r["split_layer"] else "full" for r in rows]
    axis.bar([i - 0.2 for i in range(len(rows))], [r["base_perplexity"] for r in rows], 0.4, label="base model")
    axis.bar([i + 0.2 for i in range(len(rows))], [r["perplexity"] for r in rows], 0.4, label="tenant (LoRA)")
    axis.set_xticks(range(len(rows)), labels)
    axis.set_ylabel("held-out perplexity")
    axis.set_title(f"{report['model']} on {Path(report['data']).name}")
    axis.set_ylim(0, 1.3 * max(max(r["base_perplexity"], r["perplexity"]) for r in rows))
    axis.legend(loc="upper left", fontsize="small", ncols=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
