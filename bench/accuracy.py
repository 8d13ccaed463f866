"""Accuracy study: full model + LoRA against hPLM (PLOT + bridge + upper layers + LoRA) on a labeled data set.

    python bench/accuracy.py --data ../shared/datasets/sst2[,OTHER_FOLDER...] [--split-layers 2,3,4] [--contexts 2]
                             [--methods bridge,plot,window,oracle] [--max-train N] [--seeds 0,1,2] --out FILE.json

Each FOLDER holds train.jsonl and validation.jsonl of {"text", "label"} lines; every claim is measured on
every folder given and on every seed (three by default). Two references per folder: the full model + LoRA
on query and value (what a tenant brings from PEFT's defaults) and the strong one, the full model + LoRA on
every projection of every layer at the tenants' rank (at least the adapter budget any hPLM tenant gets), so
a gap is never flattered by a smaller reference adapter. Every row prints its gap to both with the gap's
standard error over the seeds. Every domain is built from the
training texts (labels dropped) with the real knowledge-store code in a temporary LMDB, exactly as
`hmi domain build` builds it; every tenant is trained with the trainer `hmi tenant train` uses, on the
inputs serving sees. Prints a table, writes FILE.json and a PNG plot beside it. Runs in process.

Methods (one domain each per split layer L and context k; with no --methods: what `hmi domain build` does):
- `bridge` (the default): left-context PLOT of depth k with position offsets, plus the domain bridge the
  build distils on the corpus (models/bridge.py); tenants train on the bridged rows.
- `plot`: the same PLOT without a bridge (`hmi domain build --no-bridge`).
- `window`: both-sided windows of k-1 tokens each side with back-off (bench/plot_variants.py; a study-only
  ablation: k then means the window's half width plus one).
- `oracle`: the lower model's true layer-L states (no PLOT): the upper bound of any PLOT at that L.
`--adapted yes` adds, per split layer, the `plot` and `bridge` domains with MLM-adapted lower layers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.plot_variants import TrueStates, WindowPlot  # noqa: E402
from models.adapter_format import serialize_adapter  # noqa: E402
from models.bridge import bridge_rows, parse_bridge  # noqa: E402
from models.encoder import EncoderModel  # noqa: E402
from models.loading import load_tokenizer  # noqa: E402
from models.split_defaults import ENCODER_PROJECTIONS, tenant_targets  # noqa: E402
from services.common.model_specs import model_name, resolve_model_dir  # noqa: E402
from services.knowledge_store.bridge_distillation import DistillSettings  # noqa: E402
from services.knowledge_store.domain_adaptation import AdaptSettings  # noqa: E402
from services.knowledge_store.store import KnowledgeStore, StoreSettings  # noqa: E402
from training.tenant_training import build_examples, read_labeled  # noqa: E402
from training.trainer import AdapterTrainer, TrainSettings  # noqa: E402

METHODS = ("bridge", "plot", "window", "oracle")


class LocalPlot:
    """The store's lookup in process, shaped like the client's: one array per sequence, through the domain's
    bridge when asked (what compute's upper layers receive)."""

    def __init__(self, store: KnowledgeStore) -> None:
        self.store = store
        self.context = 0
        self._bridges: dict[tuple[str, int], object] = {}

    def lookup(self, domain: str, sequences: list[np.ndarray], bridged: bool = False) -> list[np.ndarray]:
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
        record, result = self.store.lookup(domain, np.concatenate(sequences), offsets, context=self.context)
        rows = [result.vectors[offsets[i]:offsets[i + 1]] for i in range(len(sequences))]
        if not bridged or record.bridge is None:
            return rows
        key = (domain, record.bridge.revision)
        if key not in self._bridges:
            self._bridges[key] = parse_bridge(self.store.get_bridge(domain, record.bridge.revision)[1],
                                              record.hidden_size)
        return bridge_rows(self._bridges[key], rows)


def parse_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def targets_at(args, dims, split_layer: int) -> str:
    """The reference's LoRA targets at L = 0; above a split what `hmi tenant train` adapts by default, unless
    --tenant-targets says otherwise."""
    if split_layer == 0:
        return args.targets
    return args.tenant_targets or ",".join(tenant_targets(dims, split_layer))


def run_one(model, plot, tokenizer, domain, split_layer, train_rows, eval_rows, label_index, args,
            targets: str = ""):
    train = build_examples(plot, tokenizer, domain, split_layer, train_rows, label_index, args.max_tokens)
    evaluation = build_examples(plot, tokenizer, domain, split_layer, eval_rows, label_index, args.max_tokens)
    accuracies = []
    started = time.perf_counter()
    targets = targets or targets_at(args, model.dims, split_layer)
    epochs = args.tenant_epochs if split_layer > 0 else args.epochs
    rank = args.tenant_rank if split_layer > 0 else args.rank
    learning_rate = args.tenant_learning_rate if split_layer > 0 else args.learning_rate
    for seed in args.seed_list:   # several seeds: a single run's accuracy is noisy (SE ~1.4 points on 872 examples)
        trainer = AdapterTrainer(model, TrainSettings(split_layer=split_layer, num_labels=len(label_index),
                                                      rank=rank, alpha=2.0 * rank, epochs=epochs,
                                                      learning_rate=learning_rate, seed=seed,
                                                      targets=tuple(targets.split(","))))
        trainer.fit(train)
        accuracies.append(trainer.accuracy(evaluation))
        print(f"   seed {seed}: {accuracies[-1]:.4f}", flush=True)
    seconds = (time.perf_counter() - started) / len(args.seed_list)
    adapter_bytes = len(serialize_adapter(trainer.adapter()))
    return Scores(accuracies), adapter_bytes, seconds


class Scores(list):
    """Accuracies of one configuration over the seeds."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self)

    @property
    def std(self) -> float:
        return statistics.stdev(self) if len(self) > 1 else 0.0

    def text(self) -> str:
        return f"{self.mean:.4f}" + (f" ± {self.std:.4f} over {len(self)} seeds" if len(self) > 1 else "")


def gap_points(reference: dict, scores: list[float]) -> tuple[float, float]:
    """How far below a reference a configuration's mean accuracy is, in points, and that gap's standard error
    over the seeds (Welch: the two sets of seeds train different models, so they are not paired). The
    validation set's own sampling error is shared by both sides and left out."""
    accuracies = reference.get("accuracies") or []
    if not accuracies:
        return float("nan"), float("nan")
    gap = 100 * (statistics.fmean(accuracies) - statistics.fmean(scores))
    variance = sum(statistics.variance(side) / len(side) for side in (accuracies, scores) if len(side) > 1)
    return gap, 100 * variance ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="labeled folder(s), comma-separated: each is studied")
    parser.add_argument("--split-layers", default="2,3,4")
    parser.add_argument("--contexts", default="2", help="PLOT context depth k (window: half width + 1)")
    parser.add_argument("--methods", default="bridge", help=f"comma-separated of {', '.join(METHODS)}")
    parser.add_argument("--max-train", type=int, default=10000)
    parser.add_argument("--max-eval", type=int, default=0, help="0: the whole validation file")
    parser.add_argument("--corpus-lines", type=int, default=0, help="training texts used as PLOT corpus (0: all)")
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="query,value", help="LoRA targets of the reference (full model)")
    parser.add_argument("--tenant-targets", default="",
                        help="LoRA targets of the tenants at L > 0 (default: what `hmi tenant train` adapts there)")
    parser.add_argument("--tenant-epochs", type=int, default=0, help="epochs of the tenants at L > 0 (0: --epochs)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="seed of adaptation (and training without --seeds)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds: accuracy is their mean (at least three "
                        "for a claim; one seed's accuracy moves by about a point)")
    parser.add_argument("--adapted", choices=["no", "yes", "only"], default="no",
                        help="also (yes) or only (only) domain-adapted lower models")
    parser.add_argument("--adapt-steps", type=int, default=300)
    parser.add_argument("--bridge-steps", type=int, default=0, help="distillation steps (0: the build's default)")
    parser.add_argument("--bridge-heads", type=int, default=0, help="ablation: bridge attention heads (0: default)")
    parser.add_argument("--bridge-head-dim", type=int, default=0, help="ablation: bridge head width (0: default)")
    parser.add_argument("--bridge-ffn", type=int, default=0, help="ablation: bridge feed-forward width (0: default)")
    parser.add_argument("--bridge-early-stopping", action="store_true",
                        help="ablation: distil until the stopping set's error stops improving")
    parser.add_argument("--tenant-rank", type=int, default=0, help="LoRA rank of the tenants at L > 0 (0: --rank)")
    parser.add_argument("--tenant-learning-rate", type=float, default=0.0,
                        help="learning rate of the tenants at L > 0 (0: --learning-rate)")
    parser.add_argument("--no-position-offsets", action="store_true", help="ablation: raw PLOT vectors")
    parser.add_argument("--no-reference", action="store_true", help="skip the full model (e.g. a second run)")
    parser.add_argument("--no-strong-reference", action="store_true",
                        help="skip the full model + LoRA on every projection (the stronger reference)")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    args.seed_list = parse_list(args.seeds) or [args.seed]
    args.tenant_epochs = args.tenant_epochs or args.epochs
    args.tenant_rank = args.tenant_rank or args.rank
    args.tenant_learning_rate = args.tenant_learning_rate or args.learning_rate
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods takes {', '.join(METHODS)}")

    folders = [Path(part) for part in args.data.split(",") if part.strip()]
    missing = [str(folder) for folder in folders if not (folder / "train.jsonl").is_file()
               or not (folder / "validation.jsonl").is_file()]
    if not folders or missing:
        parser.error(f"--data: no train.jsonl and validation.jsonl in {', '.join(missing) or 'no folder given'}")
    names = [folder.name for folder in folders]
    if len(set(names)) != len(names):
        parser.error("--data: two folders of the same name; their results would share a file")

    model_dir = resolve_model_dir(args.model)
    tokenizer = load_tokenizer(model_dir)
    model = EncoderModel(model_dir, torch.device("cpu"))
    if len(folders) == 1:
        study(folders[0], args, methods, model_dir, tokenizer, model, args.out)
        return 0
    combined = {"datasets": []}
    for folder in folders:   # one file per folder in the single-folder shape, and all of them together
        combined["datasets"].append(study(folder, args, methods, model_dir, tokenizer, model,
                                          args.out.with_name(f"{args.out.stem}-{folder.name}{args.out.suffix}")))
        write_json(args.out, combined)
    for results in combined["datasets"]:
        print(f"\n{Path(results['data']).name}:")
        print_table(results)
    return 0


def study(folder: Path, args, methods: list[str], model_dir: Path, tokenizer, model, out: Path) -> dict:
    """Every configuration of one labeled folder, beside its two references; writes OUT as it goes (a run cut
    short keeps what it measured) and a plot beside it."""
    train_rows = read_labeled(folder / "train.jsonl", args.max_train)
    eval_rows = read_labeled(folder / "validation.jsonl", args.max_eval)
    corpus_rows = read_labeled(folder / "train.jsonl", args.corpus_lines)
    corpus = "\n".join(text for text, _ in corpus_rows)
    label_index = {label: i for i, label in enumerate(sorted({label for _, label in train_rows}))}
    layers = model.dims.layers
    print(f"== {folder}: {len(train_rows)} training, {len(eval_rows)} validation examples, {len(label_index)} "
          f"labels, seeds {args.seed_list}", flush=True)

    results = {"data": str(folder), "model": model_name(args.model), "train_examples": len(train_rows),
               "eval_examples": len(eval_rows), "corpus_lines": len(corpus_rows), "epochs": args.epochs,
               "rank": args.rank, "targets": args.targets, "tenant_targets": args.tenant_targets or "default",
               "tenant_epochs": args.tenant_epochs, "tenant_rank": args.tenant_rank,
               "tenant_learning_rate": args.tenant_learning_rate, "seeds": args.seed_list,
               "bridge_settings": dataclasses.asdict(bridge_settings(args)),
               "position_offsets": not args.no_position_offsets, "methods": methods,
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
               "configurations": []}
    variants = {"no": [False], "yes": [False, True], "only": [True]}[args.adapted]
    references = [("reference", args.targets, "full model + LoRA")]
    if not args.no_strong_reference:
        references.append(("reference_strong", ",".join(ENCODER_PROJECTIONS),
                           "full model + LoRA on every projection"))
    with tempfile.TemporaryDirectory(prefix="hmi-accuracy-") as scratch:
        store = KnowledgeStore(StoreSettings(Path(scratch), model_dir, model_name(args.model), map_size=32 << 30,
                                             max_sequence_tokens=args.max_tokens, default_budget_bytes=1 << 40,
                                             default_learn_threshold=-1))
        plot = LocalPlot(store)
        if args.no_reference:
            for key, targets, _ in references:
                results[key] = {"accuracy": float("nan"), "accuracy_std": 0.0, "accuracies": [],
                                "targets": targets, "gflops_per_token": gflops_per_token(model.dims, layers)}
        else:
            store.build_domain("full", "", split_layer=0, context=1, min_count=1)
            for key, targets, label in references:
                accuracy, adapter_bytes, seconds = run_one(model, plot, tokenizer, "full", 0, train_rows, eval_rows,
                                                           label_index, args, targets=targets)
                results[key] = {"accuracy": accuracy.mean, "accuracy_std": accuracy.std, "accuracies": accuracy,
                                "targets": targets, "adapter_bytes": adapter_bytes, "train_seconds": seconds,
                                "gflops_per_token": gflops_per_token(model.dims, layers)}
                print(f"{label}: accuracy {accuracy.text()} ({seconds:.0f}s training, adapter "
                      f"{adapter_bytes / 1024:.0f} KiB)", flush=True)
                write_json(out, results)
        for split_layer in parse_list(args.split_layers):
            for context in parse_list(args.contexts):
                for method in methods:
                    for adapted in variants if method in ("plot", "bridge") else [False]:
                        row = run_method(method, adapted, split_layer, context, store, plot, model, tokenizer,
                                         corpus, train_rows, eval_rows, label_index, args, results)
                        results["configurations"].append(row)
                        write_json(out, results)
        store.close()

    write_json(out, results)
    print_table(results)
    plot_results(results, out.with_suffix(".png"))
    return results


def run_method(method, adapted, split_layer, context, store, plot, model, tokenizer, corpus, train_rows, eval_rows,
               label_index, args, results) -> dict:
    """Builds the layer-L inputs of one configuration, trains its tenants and returns its result row."""
    dims, layers = model.dims, model.dims.layers
    name = f"L{split_layer}-k{context}-{method}{'-adapted' if adapted else ''}"
    started = time.perf_counter()
    adapt_report, bridge_report, record = None, None, None
    nodes, plot_bytes, extra_layers = 0, 0, 0.0
    source = plot
    if method in ("plot", "bridge"):
        if adapted:
            adapted_record = store.adapt_domain(name, corpus, split_layer=split_layer, settings=AdaptSettings(
                split_layer, steps=args.adapt_steps, seed=args.seed))
            adapt_report = dataclasses.asdict(adapted_record.adapt)
            print(f"{name}: adapted lower layers, held-out MLM loss {adapted_record.adapt.base_loss:.3f} -> "
                  f"{adapted_record.adapt.adapted_loss:.3f} ({adapted_record.adapt.seconds:.0f}s)", flush=True)
        record = store.build_domain(name, corpus, split_layer=split_layer, context=context,
                                    min_count=args.min_count, position_offsets=not args.no_position_offsets,
                                    no_bridge=method == "plot",
                                    bridge=bridge_settings(args))
        nodes, plot_bytes = record.nodes, record.plot_bytes
        if record.bridge is not None:
            bridge_report = dataclasses.asdict(record.bridge)
            extra_layers = record.bridge.cost_in_layers
            print(f"{name}: bridge distilled in {record.bridge.steps} steps on {record.bridge.sequences} sequences, "
                  f"held-out error {record.bridge.loss_before:.4f} -> {record.bridge.loss_after:.4f} "
                  f"({record.bridge.seconds:.0f}s)", flush=True)
    elif method == "window":
        builder = store.lower_models.base(store.model_name(""))
        source = WindowPlot(builder, split_layer, radius=context - 1, min_count=args.min_count,
                            max_tokens=args.max_tokens, position_offsets=not args.no_position_offsets)
        source.build(corpus.splitlines())
        nodes, plot_bytes = source.nodes, source.nodes * dims.hidden * 2
    else:
        source = TrueStates(store.lower_models.base(store.model_name("")), split_layer)
    build_seconds = time.perf_counter() - started
    accuracy, adapter_bytes, seconds = run_one(model, source, tokenizer, name, split_layer, train_rows, eval_rows,
                                               label_index, args)
    row = {"split_layer": split_layer, "context": context, "method": method, "domain_adapted": adapted,
           "tenant_targets": targets_at(args, dims, split_layer),
           "position_offsets": not args.no_position_offsets,
           "accuracy": accuracy.mean, "accuracy_std": accuracy.std, "accuracies": accuracy,
           "accuracy_loss_points": 100 * (results["reference"]["accuracy"] - accuracy.mean),
           "accuracy_loss_se_points": gap_points(results["reference"], accuracy)[1],
           "plot_bytes": plot_bytes, "nodes": nodes,
           "nodes_per_depth": record.nodes_per_depth if record is not None else [],
           "bridge": bridge_report, "adapter_bytes": adapter_bytes,
           "upper_layer_share": (layers - split_layer) / layers,
           "layers_computed": layers - split_layer + extra_layers,
           "gflops_per_token": gflops_per_token(dims, layers - split_layer + extra_layers),
           "build_seconds": build_seconds, "train_seconds": seconds, "adapt": adapt_report}
    if "reference_strong" in results:
        row["strong_loss_points"], row["strong_loss_se_points"] = gap_points(results["reference_strong"], accuracy)
    print(f"{name}: accuracy {accuracy.text()} ({gap_text(row)}), PLOT "
          f"{plot_bytes / 2**20:.1f} MiB, {nodes} nodes", flush=True)
    if record is not None:
        store.delete_domain(name)
    return row


def bridge_settings(args) -> DistillSettings:
    """The build's distillation defaults, changed only where the study's bridge flags say so."""
    settings = DistillSettings(steps=args.bridge_steps, seed=args.seed, early_stopping=args.bridge_early_stopping)
    for name in ("heads", "head_dim", "ffn"):
        value = getattr(args, f"bridge_{name}")
        if value:
            setattr(settings, name, value)
    return settings


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def gflops_per_token(dims, computed_layers: float) -> float:
    """Dense multiply-adds of the layers computed (a bridge counts as its share of a layer), per token
    (attention scores left out: short sequences)."""
    return 2 * computed_layers * (4 * dims.hidden ** 2 + 2 * dims.hidden * dims.intermediate) / 1e9


def gap_text(row: dict) -> str:
    """The row's distance below each reference, with its standard error over the seeds."""
    parts = [f"{row['accuracy_loss_points']:+.2f} ± {row.get('accuracy_loss_se_points', float('nan')):.2f} points "
             f"below the full model"]
    if "strong_loss_points" in row:
        parts.append(f"{row['strong_loss_points']:+.2f} ± {row['strong_loss_se_points']:.2f} below the strong "
                     f"reference")
    return ", ".join(parts)


def print_table(results: dict) -> None:
    """Gaps are points below the reference (positive: the hPLM is less accurate), ± their standard error."""
    print(f"\n{'L':>2} {'k':>2} {'method':>8} {'adapted':>7} {'accuracy':>9} {'± std':>7} {'gap pts':>13} "
          f"{'strong gap':>13} {'PLOT MiB':>9} {'nodes':>8} {'GFLOP/tok':>9}")
    for key, name in (("reference", "full"), ("reference_strong", "full-all")):
        if key in results:
            reference = results[key]
            print(f"{'-':>2} {'-':>2} {name:>8} {'-':>7} {reference['accuracy']:9.4f} {reference['accuracy_std']:7.4f} "
                  f"{'':>13} {'':>13} {'':>9} {'':>8} {reference['gflops_per_token']:9.4f}")
    for row in results["configurations"]:
        gap = f"{row['accuracy_loss_points']:.2f} ± {row.get('accuracy_loss_se_points', float('nan')):.2f}"
        strong = (f"{row['strong_loss_points']:.2f} ± {row['strong_loss_se_points']:.2f}"
                  if "strong_loss_points" in row else "-")
        print(f"{row['split_layer']:>2} {row['context']:>2} {row.get('method', 'plot'):>8} "
              f"{'yes' if row['domain_adapted'] else 'no':>7} {row['accuracy']:9.4f} {row['accuracy_std']:7.4f} "
              f"{gap:>13} {strong:>13} {row['plot_bytes'] / 2**20:9.1f} {row['nodes']:8d} "
              f"{row['gflops_per_token']:9.4f}")


def plot_results(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    def key(row: dict) -> tuple:
        return (row.get("method", "plot"), row["context"], row["domain_adapted"],
                row.get("tenant_targets", results.get("targets", "query,value")))

    for method, context, adapted, targets in sorted({key(row) for row in results["configurations"]}):
        rows = [r for r in results["configurations"] if key(r) == (method, context, adapted, targets)]
        label = (f"{method}, k = {context}{', adapted' if adapted else ''}, LoRA on "
                 f"{'every projection' if len(targets.split(',')) >= 6 else targets}")
        style = "--" if adapted else "-"
        left.errorbar([r["split_layer"] for r in rows], [r["accuracy"] for r in rows],
                      yerr=[r["accuracy_std"] for r in rows], fmt=style, marker="o", capsize=3, label=label)
        right.plot([r["gflops_per_token"] for r in rows], [r["accuracy"] for r in rows], style, marker="o",
                   label=label)
    for axis in (left, right):
        axis.axhline(results["reference"]["accuracy"], color="black", linestyle="--", label="full model + LoRA")
        if "reference_strong" in results:
            axis.axhline(results["reference_strong"]["accuracy"], color="grey", linestyle=":",
                         label="full model + LoRA on every projection")
        axis.set_ylabel("accuracy")
        axis.legend(fontsize=7)
    left.set_xlabel("split layer L")
    right.set_xlabel("compute per token (GFLOP: layers [L, N) and the bridge)")
    seeds = len(results.get("seeds", [])) or 1
    figure.suptitle(f"{Path(results['data']).name}: hPLM vs full model ({results['train_examples']} training "
                    f"examples, mean of {seeds} seed(s))")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot saved to {path}")


if __name__ == "__main__":
    sys.exit(main())
