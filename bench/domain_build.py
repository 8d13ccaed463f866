"""Where a bridged `hmi domain build` spends its time, and what the distillation's settings cost and give.

    python bench/domain_build.py --corpus ../shared/datasets/sst2/train.jsonl --lines 5000 \
        --out bench/results/domain-build.json

Builds one domain from the first LINES texts of CORPUS (JSONL with "text", or plain lines) with the real
knowledge-store code in a temporary LMDB, as `hmi domain build` does at the model's recommended setting
(MiniLM: split layer 3, context 2, domain bridge), and times each phase from the build's own progress
reports: tokenising + deduplicating + counting, the lower model over the corpus ("encoding"), the isolated
vocabulary vectors, the held-out rows and targets (with the position offsets), packing, the distillation
steps, writing. Then it runs the PLOT builder again for the same held-out rows and distils them with each
`--compare` configuration (default: the settings builds used before 2026-12-01, at torch's default thread
count as the store ran them, and at one thread), so every bridge is distilled on identical rows. `NAME:N`
runs only N of its steps (its rate measured, its loss then not comparable: on a busy machine the earlier
settings at two threads take 20 minutes). Torch keeps its default thread count here, as in the store.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from services.common.model_specs import model_name, resolve_model_dir  # noqa: E402
from services.knowledge_store.bridge_distillation import HELD_OUT, DistillSettings, distill  # noqa: E402
from services.knowledge_store.plot_builder import BuildSettings  # noqa: E402
from services.knowledge_store.store import KnowledgeStore, StoreSettings  # noqa: E402


def read_corpus(path: Path, lines: int) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                texts.append(str(json.loads(line)["text"]) if line.startswith("{") else line)
            if lines and len(texts) >= lines:
                break
    return texts


class PhaseClock:
    """Progress callback: when each stage was first and last reported, and the distillation's steps."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.done: dict[str, tuple[int, int]] = {}
        self.printed = 0.0

    def __call__(self, stage: str, done: int, total: int, loss: float = 0.0) -> None:
        now = time.perf_counter() - self.started
        self.first.setdefault(stage, now)
        self.last[stage] = now
        self.done[stage] = (done, total)
        if stage == "distilling" and (now - self.printed >= 15 or done == total):
            self.printed = now
            print(f"  [{now:6.1f}s] distilling {done}/{total} loss {loss:.4f}", flush=True)

    def phases(self, total: float) -> dict[str, float]:
        f, last = self.first, self.last
        encode_end = f.get("vocabulary", last.get("encoding", 0.0))
        plot_end = last.get("vocabulary", last.get("encoding", 0.0))
        steps_start = f.get("distilling", plot_end)
        return {"tokenise, deduplicate, count": f.get("encoding", 0.0),
                "lower model over the corpus": encode_end - f.get("encoding", 0.0),
                "isolated vocabulary vectors": plot_end - encode_end,
                "held-out rows + targets, offsets, packing": steps_start - plot_end,
                "distillation steps": last.get("distilling", steps_start) - steps_start,
                "writing": total - last.get("distilling", steps_start)}


def legacy_settings(sequences: int, threads: int, max_steps: int) -> DistillSettings:
    """What builds distilled with before: batches of 64, 30 passes (at most 4,000 steps), a linear decay,
    no early stopping, torch's thread count (bit for bit the loop of then: tests/test_domain_bridge.py)."""
    train = sequences - min(HELD_OUT, max(1, sequences // 10))
    steps = min(4000, 30 * math.ceil(train / 64))
    return DistillSettings(steps=min(steps, max_steps) if max_steps else steps, batch_size=64, learning_rate=3e-3,
                           threads=threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=5000)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--split-layer", type=int, default=3)
    parser.add_argument("--context", type=int, default=2)
    parser.add_argument("--compare", default="legacy,legacy-1-thread",
                        help="comma-separated: legacy (the earlier settings, torch's threads), legacy-1-thread, "
                             "none; NAME:N runs N steps only")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    lines = read_corpus(args.corpus, args.lines)
    results = {"corpus": str(args.corpus), "lines": len(lines), "split_layer": args.split_layer,
               "context": args.context, "torch_threads": torch.get_num_threads(),
               "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="hmi-domain-build-") as folder:
        store = KnowledgeStore(StoreSettings(Path(folder), model_dir, model_name(args.model), map_size=4 << 30,
                                             default_budget_bytes=1 << 40, default_learn_threshold=-1))
        builder = store.lower_models.base(store.model_name(""))   # loaded before the clock starts
        clock = PhaseClock()
        record = store.build_domain("bench", "\n".join(lines), split_layer=args.split_layer, context=args.context,
                                    min_count=2, progress=clock)
        total = time.perf_counter() - clock.started
        bridge = record.bridge
        if bridge is None:
            parser.error("the distilled bridge did not lower the held-out error and was discarded (corpus too small?)")
        after = {"name": "now (defaults)", "settings": DistillSettings().__dict__, "steps": bridge.steps,
                 "planned_steps": clock.done["distilling"][1], "sequences": bridge.sequences,
                 "tokens": bridge.tokens, "loss_before": bridge.loss_before, "loss_after": bridge.loss_after,
                 "distill_seconds": bridge.seconds, "build_seconds": total, "phases": clock.phases(total)}
        after["steps_per_second"] = bridge.steps / max(after["phases"]["distillation steps"], 1e-9)
        results["runs"].append(after)
        print(json.dumps({key: value for key, value in after.items() if key != "settings"}, indent=1), flush=True)

        compare = [c.strip() for c in args.compare.split(",") if c.strip() and c.strip() != "none"]
        if compare:
            contents = builder.build(lines, BuildSettings(args.split_layer, args.context, 2,
                                                          store.settings.max_sequence_tokens,
                                                          capture_tokens=DistillSettings().max_tokens_total))
            rows, targets = contents.held_out
            for entry in compare:
                name, _, limit = entry.partition(":")
                if name not in ("legacy", "legacy-1-thread"):
                    parser.error(f"unknown --compare entry {entry!r}")
                settings = legacy_settings(len(rows), 0 if name == "legacy" else 1, int(limit or 0))
                clock = PhaseClock()
                result = distill(rows, targets, store.model_dims[store.model_name("")].hidden, settings, clock)
                steps_seconds = clock.last["distilling"] - clock.first["distilling"]
                run = {"name": entry, "settings": settings.__dict__, "steps": result.steps,
                       "sequences": result.sequences, "tokens": result.tokens, "loss_before": result.loss_before,
                       "loss_after": result.loss_after, "distill_seconds": result.seconds,
                       "steps_per_second": result.steps / max(steps_seconds, 1e-9),
                       "complete": not limit}
                results["runs"].append(run)
                print(json.dumps({key: value for key, value in run.items() if key != "settings"}), flush=True)
        store.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("\n| run | steps | steps/s | distillation | held-out MSE before -> after |\n| --- | --- | --- | --- | --- |")
    for run in results["runs"]:
        print(f"| {run['name']} | {run['steps']:,} | {run['steps_per_second']:.1f} | {run['distill_seconds']:.0f} s | "
              f"{run['loss_before']:.4f} -> {run['loss_after']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
