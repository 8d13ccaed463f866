"""`hmi bench`: one driver process per system, same workload; a table, FILE.json and a PNG beside it."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hmi.bench.workload import DEMO_CORPUS, WorkloadSpec


def add_arguments(parser) -> None:
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent α")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per system")
    parser.add_argument("--systems", default=None, help="naive,peft,hmi (generate: peft,hmi)")
    parser.add_argument("--task", choices=["classify", "generate"], default="classify",
                        help="generate: each request generates --max-new-tokens tokens greedily (decoder model)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--clients", type=int, default=16, help="closed loop: concurrent clients")
    parser.add_argument("--rate", type=float, default=50.0, help="open loop: requests per second (Poisson)")
    parser.add_argument("--model", default=None, help="base model: name or local folder (default: minilm; "
                                                       "generate: smollm2)")
    parser.add_argument("--split-layer", type=int, default=None,
                        help="HMI's L; adapters cover layers [L, N) (default: the recommended setting of the "
                             "model, the one `hmi domain build` gives a new domain)")
    parser.add_argument("--split-layers", default=None,
                        help="several L, e.g. 0,3: HMI runs at each one after the other (same tenants, same "
                             "requests), entries hmi@L0, hmi@L3; naive and peft run once")
    parser.add_argument("--decoder-weights", choices=["float32", "bfloat16"], default="float32",
                        help="generate: HMI compute's copy of the shared decoder weights (PEFT keeps the model's "
                             "float32)")
    parser.add_argument("--memory-budget-mib", type=int, default=2048, help="naive: memory for per-tenant models")
    parser.add_argument("--corpus", type=Path, default=DEMO_CORPUS, help="texts of the requests and of HMI's PLOT")
    parser.add_argument("--sweep", action="store_true", help="afterwards, send one request to every tenant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)


def run_bench(args) -> int:
    from hmi.bench.driver import as_json
    from hmi.bench.systems import BenchSettings
    from models.dims import ModelDims
    from models.split_defaults import default_split
    from services.common.model_specs import resolve_model_dir
    generating = args.task == "generate"
    known = {"peft", "hmi"} if generating else {"naive", "peft", "hmi"}
    systems = [name.strip() for name in (args.systems or ",".join(sorted(known))).split(",") if name.strip()]
    unknown = set(systems) - known
    if unknown or not systems:
        print(f"error: --systems takes {', '.join(sorted(known))} for --task {args.task} "
              f"(got {sorted(unknown) or 'none'})", file=sys.stderr)
        return 2
    if generating and args.max_new_tokens < 1:
        print("error: --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    if args.tenants < 1 or args.duration <= 0:
        print("error: --tenants must be >= 1 and --duration > 0", file=sys.stderr)
        return 2
    try:
        listed = parse_split_layers(args.split_layers) if args.split_layers is not None else None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model = args.model or ("smollm2" if generating else "minilm")
    model_dir = resolve_model_dir(model)
    recommended = default_split(ModelDims.from_dir(model_dir))
    split_layers = listed or [recommended.split_layer if args.split_layer is None else args.split_layer]
    spec = WorkloadSpec(tenants=args.tenants, zipf=args.zipf, duration=args.duration, mode=args.mode,
                        clients=args.clients, rate=args.rate, seed=args.seed, corpus=args.corpus.resolve(),
                        task=args.task, max_new_tokens=args.max_new_tokens)
    settings = BenchSettings(model_dir=model_dir, split_layer=max(split_layers),
                             memory_budget_bytes=args.memory_budget_mib << 20, corpus=args.corpus.resolve(),
                             logs_dir=logs_dir(args.out), decoder_weights=args.decoder_weights)
    report = {"workload": json.loads(as_json(spec)), "model": str(settings.model_dir),
              "split_layer": split_layers[-1], "split_layers": split_layers,
              "recommended": {"split_layer": recommended.split_layer, "context": recommended.context,
                              "bridge": recommended.bridge, "accuracy_cost": recommended.accuracy_cost},
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "started": time.time(), "systems": {}}
    print(f"recommended setting of {model}: {recommended.describe()}", flush=True)
    named = args.split_layers is not None
    runs = [(name, settings) for name in systems if name != "hmi"]
    if "hmi" in systems:
        runs += [(f"hmi@L{layer}" if named else "hmi", dataclasses.replace(settings, split_layer=layer,
                                                                          logs_dir=logs_dir(args.out, layer, named)))
                 for layer in split_layers]
    with tempfile.TemporaryDirectory(prefix="hmi-bench-") as folder:
        for name, run_settings in runs:
            system = name.split("@")[0]
            out = Path(folder) / f"{name}.json"
            print(f"== {name}: {args.tenants} tenants, zipf {args.zipf}, {args.mode} loop, {args.duration:.0f}s, "
                  f"split layer {run_settings.split_layer}", flush=True)
            command = [sys.executable, "-m", "hmi.bench.driver", "--system", system, "--spec", as_json(spec),
                       "--settings", as_json(run_settings), "--out", str(out)] + (["--sweep"] if args.sweep else [])
            finished = subprocess.run(command)
            if finished.returncode != 0 or not out.exists():
                report["systems"][name] = {"system": name, "failed": f"exit code {finished.returncode}"}
                print(f"   {name} failed (exit code {finished.returncode})", flush=True)
                continue
            report["systems"][name] = json.loads(out.read_text())
    add_ratios(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    plot(report, args.out.with_suffix(".png"))
    print(f"results in {args.out} and {args.out.with_suffix('.png')}; HMI's service logs in "
          f"{logs_dir(args.out)}")
    return 0 if all("failed" not in r for r in report["systems"].values()) else 1


def parse_split_layers(text: str) -> list[int]:
    """--split-layers "0,3" -> [0, 3]; ValueError with what is wrong."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--split-layers takes comma-separated integers, e.g. 0,3 (got {text!r})") from None
    if not layers or min(layers) < 0 or len(set(layers)) != len(layers):
        raise ValueError(f"--split-layers takes distinct layers >= 0, e.g. 0,3 (got {text!r})")
    return layers


def hmi_entry(report: dict) -> dict:
    """The HMI run the other systems are compared with: the one at the recommended L when there are several."""
    systems = report["systems"]
    if "hmi" in systems:
        return systems["hmi"]
    preferred = f"hmi@L{report['recommended']['split_layer']}"
    runs = [name for name in systems if name.startswith("hmi@")]
    return systems.get(preferred) or (systems[runs[-1]] if runs else {})


def add_ratios(report: dict) -> None:
    hmi = hmi_entry(report)
    for other in ("naive", "peft"):
        theirs = report["systems"].get(other, {})
        if hmi.get("throughput_rps") and theirs.get("throughput_rps"):
            report[f"hmi_over_{other}_throughput"] = hmi["throughput_rps"] / theirs["throughput_rps"]
        if hmi.get("tokens_per_s") and theirs.get("tokens_per_s"):
            report[f"hmi_over_{other}_tokens_per_s"] = hmi["tokens_per_s"] / theirs["tokens_per_s"]
    base = report["systems"].get("hmi@L0", {})
    for name, run in report["systems"].items():
        if name.startswith("hmi@") and name != "hmi@L0" and base.get("throughput_rps") and run.get("throughput_rps"):
            report.setdefault("over_hmi_at_L0_throughput", {})[name] = run["throughput_rps"] / base["throughput_rps"]


def logs_dir(out: Path, split_layer: int = 0, named: bool = False) -> Path:
    return (out.parent / (f"{out.stem}-logs-L{split_layer}" if named else f"{out.stem}-logs")).resolve()


def print_table(report: dict) -> None:
    print(f"\n{'system':8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'peak RSS MiB':>13} {'tenants':>8} "
          f"{'errors':>6} {'setup s':>8}")
    for name, r in report["systems"].items():
        if "failed" in r:
            print(f"{name:8} failed: {r['failed']}")
            continue
        print(f"{name:8} {r['throughput_rps']:8.1f} {r['p50_ms'] or 0:8.1f} {r['p99_ms'] or 0:8.1f} "
              f"{r['peak_rss_bytes'] / 2**20:13.0f} {r['tenants_served']:8d} {r['errors']:6d} "
              f"{r['setup_seconds']:8.1f}")
    generated = [(name, r) for name, r in report["systems"].items() if "tokens_per_s" in r]
    if generated:
        print(f"\n{'system':8} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
        for name, r in generated:
            print(f"{name:8} {r['tokens_per_s']:9.1f} {r['ttft_p50_ms'] or 0:9.1f} {r['ttft_p99_ms'] or 0:9.1f} "
                  f"{r['itl_p50_ms'] or 0:8.1f} {r['itl_p99_ms'] or 0:8.1f}")
    for other in ("naive", "peft"):
        if f"hmi_over_{other}_throughput" in report:
            print(f"HMI throughput = {report[f'hmi_over_{other}_throughput']:.2f}x {other}")
        if f"hmi_over_{other}_tokens_per_s" in report:
            print(f"HMI tokens/s = {report[f'hmi_over_{other}_tokens_per_s']:.2f}x {other}")
    for name, ratio in report.get("over_hmi_at_L0_throughput", {}).items():
        print(f"{name} throughput = {ratio:.2f}x hmi@L0")
    print(f"accuracy at the recommended setting: {report['recommended']['accuracy_cost']}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r) for name, r in report["systems"].items() if "failed" not in r]
    if not rows:
        return
    names = [name for name, _ in rows]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    generated = all("tokens_per_s" in r for _, r in rows)
    rate, low, high = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms") if generated else ("throughput_rps", "p50_ms",
                                                                                          "p99_ms")
    axes[0].bar(names, [r[rate] for _, r in rows], color="tab:blue")
    axes[0].set_ylabel("generated tokens / s" if generated else "requests / s")
    width = 0.38
    positions = range(len(rows))
    axes[1].bar([p - width / 2 for p in positions], [r[low] or 0 for _, r in rows], width, label="p50")
    axes[1].bar([p + width / 2 for p in positions], [r[high] or 0 for _, r in rows], width, label="p99")
    axes[1].set_xticks(list(positions), names)
    axes[1].set_ylabel("time to first token (ms)" if generated else "latency (ms)")
    axes[1].legend()
    axes[2].bar(names, [r["peak_rss_bytes"] / 2**20 for _, r in rows], color="tab:gray")
    axes[2].set_ylabel("peak RSS (MiB)")
    workload = report["workload"]
    figure.suptitle(f"{workload.get('task', 'classify')}: {workload['tenants']} tenants, Zipf α={workload['zipf']}, "
                    f"{workload['mode']} loop "
                    f"({report['machine']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
