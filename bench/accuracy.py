"""Accuracy study: full model + LoRA against hPLM (PLOT + upper layers + LoRA) on a labeled data set.

    python bench/accuracy.py --data ../shared/datasets/sst2 [--split-layers 1,2,3,4] [--contexts 1,2,3,4]
                             [--max-train N] --out FILE.json

FOLDER holds train.jsonl and validation.jsonl of {"text", "label"} lines. The PLOT of each configuration is
built from the training texts (labels dropped) with the real knowledge-store code in a temporary LMDB; every
tenant is trained with the trainer `hmi tenant train` uses, on the inputs serving sees. Prints a table,
writes FILE.json and a PNG plot beside it. Runs in process: no services are needed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.common.adapter_format import serialize_adapter  # noqa: E402
from services.common.models import load_tokenizer, model_name, resolve_model_dir  # noqa: E402
from services.compute.model_split import UpperModel  # noqa: E402
from services.knowledge_store.store import KnowledgeStore, StoreSettings  # noqa: E402
from services.training.tenant_training import build_examples, read_labeled  # noqa: E402
from services.training.trainer import AdapterTrainer, TrainSettings  # noqa: E402


class LocalPlot:
    """The store's lookup in process, shaped like the client's: one array per sequence."""

    def __init__(self, store: KnowledgeStore) -> None:
        self.store = store

    def lookup(self, domain: str, sequences: list[np.ndarray]) -> list[np.ndarray]:
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
        _, result = self.store.lookup(domain, np.concatenate(sequences), offsets)
        return [result.vectors[offsets[i]:offsets[i + 1]] for i in range(len(sequences))]


def parse_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def run_one(model, plot, tokenizer, domain, split_layer, train_rows, eval_rows, label_index, args):
    train = build_examples(plot, tokenizer, domain, split_layer, train_rows, label_index, args.max_tokens)
    evaluation = build_examples(plot, tokenizer, domain, split_layer, eval_rows, label_index, args.max_tokens)
    trainer = AdapterTrainer(model, TrainSettings(split_layer=split_layer, num_labels=len(label_index),
                                                  rank=args.rank, alpha=2.0 * args.rank, epochs=args.epochs,
                                                  learning_rate=args.learning_rate, seed=args.seed))
    started = time.perf_counter()
    trainer.fit(train)
    seconds = time.perf_counter() - started
    adapter_bytes = len(serialize_adapter(trainer.adapter()))
    return trainer.accuracy(evaluation), adapter_bytes, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split-layers", default="1,2,3,4")
    parser.add_argument("--contexts", default="1,2,3,4")
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--max-eval", type=int, default=0, help="0: the whole validation file")
    parser.add_argument("--corpus-lines", type=int, default=0, help="training texts used as PLOT corpus (0: all)")
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    model_dir = resolve_model_dir(args.model)
    train_rows = read_labeled(args.data / "train.jsonl", args.max_train)
    eval_rows = read_labeled(args.data / "validation.jsonl", args.max_eval)
    corpus_rows = read_labeled(args.data / "train.jsonl", args.corpus_lines)
    corpus = "\n".join(text for text, _ in corpus_rows)
    label_index = {label: i for i, label in enumerate(sorted({label for _, label in train_rows}))}
    tokenizer = load_tokenizer(model_dir)
    model = UpperModel(model_dir, torch.device("cpu"))
    layers = model.dims.layers

    results = {"data": str(args.data), "model": model_name(args.model), "train_examples": len(train_rows),
               "eval_examples": len(eval_rows), "corpus_lines": len(corpus_rows), "epochs": args.epochs,
               "rank": args.rank, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "configurations": []}
    with tempfile.TemporaryDirectory(prefix="hmi-accuracy-") as folder:
        store = KnowledgeStore(StoreSettings(Path(folder), model_dir, model_name(args.model),
                                             map_size=32 << 30, max_sequence_tokens=args.max_tokens))
        plot = LocalPlot(store)
        store.build_domain("full", "", split_layer=0, context=1, min_count=1)
        accuracy, adapter_bytes, seconds = run_one(model, plot, tokenizer, "full", 0, train_rows, eval_rows,
                                                   label_index, args)
        results["reference"] = {"accuracy": accuracy, "adapter_bytes": adapter_bytes, "train_seconds": seconds}
        print(f"full model + LoRA: accuracy {accuracy:.4f} ({seconds:.0f}s training)", flush=True)
        for split_layer in parse_list(args.split_layers):
            for context in parse_list(args.contexts):
                name = f"L{split_layer}-k{context}"
                started = time.perf_counter()
                record = store.build_domain(name, corpus, split_layer=split_layer, context=context,
                                            min_count=args.min_count)
                build_seconds = time.perf_counter() - started
                accuracy, adapter_bytes, seconds = run_one(model, plot, tokenizer, name, split_layer, train_rows,
                                                           eval_rows, label_index, args)
                row = {"split_layer": split_layer, "context": context, "domain_adapted": False,
                       "accuracy": accuracy, "accuracy_loss_points": 100 * (results["reference"]["accuracy"] - accuracy),
                       "plot_bytes": record["plot_bytes"], "nodes": record["nodes"],
                       "nodes_per_depth": record["nodes_per_depth"], "adapter_bytes": adapter_bytes,
                       "upper_layer_share": (layers - split_layer) / layers, "build_seconds": build_seconds,
                       "train_seconds": seconds}
                results["configurations"].append(row)
                print(f"L={split_layer} k={context}: accuracy {accuracy:.4f} ({row['accuracy_loss_points']:+.2f} "
                      f"points below full), PLOT {record['plot_bytes'] / 2**20:.1f} MiB, {record['nodes']} nodes",
                      flush=True)
                store.delete_domain(name)
        store.close()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(results)
    plot_results(results, args.out.with_suffix(".png"))
    return 0


def print_table(results: dict) -> None:
    print(f"\n{'L':>2} {'k':>2} {'accuracy':>9} {'loss pts':>9} {'PLOT MiB':>9} {'nodes':>8} {'upper share':>11}")
    print(f"{'-':>2} {'-':>2} {results['reference']['accuracy']:9.4f} {'(full)':>9}")
    for row in results["configurations"]:
        print(f"{row['split_layer']:>2} {row['context']:>2} {row['accuracy']:9.4f} {row['accuracy_loss_points']:9.2f} "
              f"{row['plot_bytes'] / 2**20:9.1f} {row['nodes']:8d} {row['upper_layer_share']:11.2f}")


def plot_results(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    contexts = sorted({row["context"] for row in results["configurations"]})
    for context in contexts:
        rows = [r for r in results["configurations"] if r["context"] == context]
        left.plot([r["split_layer"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=f"k = {context}")
        right.plot([r["plot_bytes"] / 2**20 for r in rows], [r["accuracy"] for r in rows], marker="o",
                   label=f"k = {context}")
    for axis in (left, right):
        axis.axhline(results["reference"]["accuracy"], color="black", linestyle="--", label="full model + LoRA")
        axis.set_ylabel("accuracy")
        axis.legend()
    left.set_xlabel("split layer L")
    right.set_xlabel("PLOT size (MiB)")
    figure.suptitle(f"{Path(results['data']).name}: hPLM vs full model ({results['train_examples']} training examples)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot saved to {path}")


if __name__ == "__main__":
    sys.exit(main())
