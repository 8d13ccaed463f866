"""Where a short-text request's time goes at the recommended encoder setting, service by service.

Starts the three services (real processes, real gRPC), builds a domain from the demo corpus with the model's
default split (PLOT + bridge), registers tenants whose adapters are those `hmi bench` gives them, then runs a
closed loop of one-text Classify requests. It reads every process's CPU time from /proc around the load and,
when py-spy is installed, samples each service for the run and prints the functions its CPU goes to.
Finally it times the upper layers alone in this process on a batch of the size compute saw, beside a large
`torch.mm`, for the roofline.

    python bench/profile_serving.py --tenants 200 --clients 16 --duration 20 --out bench/results/profile.json

Writes FILE.json and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLOCK = os.sysconf("SC_CLK_TCK")
PROJECT = ("(services/", "(models/", "(hmi_kernels/", "(hmi_client/", "(hmi/")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK


def spy(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(exe).exists():
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "200",
                             "--format", "raw", "--output", str(out), "--gil", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_functions(raw: Path, count: int) -> list[tuple[str, float]]:
    """Share of the GIL-holding samples (py-spy --gil: Python work, torch's kernels release the GIL) spent inside
    each function of the project (inclusive), from py-spy's collapsed stacks."""
    if not raw.exists():
        return []
    totals: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        samples += int(n)
        for name in {f.rpartition(":")[0] + ")" for f in frames if any(part in f for part in PROJECT)}:
            totals[name] = totals.get(name, 0) + int(n)
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:count]
    return [(name, n / max(1, samples)) for name, n in ranked]


def stage_sums(url: str) -> dict[str, tuple[float, float]]:
    """(seconds summed, count) of every labelled histogram series whose name ends in _stage_seconds."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.endswith("_stage_seconds"):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                key = f"{family.name.removeprefix('hmi_')}.{sample.labels.get('stage', '')}"
                entry = out.setdefault(key, [0.0, 0.0])
                entry[0 if sample.name.endswith("_sum") else 1] = sample.value
    return {key: (value[0], value[1]) for key, value in out.items()}


class GatewayTenants:
    """The HMI deployment as `hmi bench`'s load loops call a system: tenant i is `t{i}`, one Classify per text."""

    def __init__(self, client) -> None:
        self.client = client

    def classify(self, tenant: int, texts: list[str]) -> None:
        self.client.classify(f"t{tenant}", texts, truncate=True)


def load(client, tenants: int, corpus: Path, clients: int, duration: float, seed: int) -> list[float]:
    """Latencies of `hmi bench`'s closed loop (Zipf 1.0 over the tenants, texts of the corpus); an error fails
    the profile, which measures a deployment that answers."""
    from hmi.bench.driver import Recorder, closed_loop
    from hmi.bench.workload import WorkloadSpec, make_requests
    recorder = Recorder()
    closed_loop(GatewayTenants(client), make_requests(WorkloadSpec(tenants=tenants, corpus=corpus, seed=seed),
                                                      200_000), clients, duration, recorder)
    if recorder.errors:
        raise SystemExit(f"{len(recorder.errors)} requests failed, e.g. {recorder.errors[0]}")
    return recorder.latencies


def compute_stats(services):
    from services.common.rpc import channel as service_channel
    from services.compute.client import stats
    with service_channel(services.compute_addrs[0], security=services.peer_security()) as channel:
        return stats(channel)


def flops_per_token(dims, split_layer: int, lora_flops: int = 0, bridge: bool = True) -> float:
    """Dense FLOPs of the upper layers and (above a split) the default bridge per token; attention scores left
    out, as in docs/performance.md's roofline."""
    from models.bridge import BridgeShape
    layers = dims.layers - split_layer
    dense = 2 * (4 * dims.hidden ** 2 + 2 * dims.hidden * dims.intermediate) * layers
    bridged = BridgeShape(hidden=dims.hidden).flops_per_token() if bridge and split_layer else 0
    return dense + bridged + lora_flops


def upper_layers_alone(model_dir: Path, split_layer: int, sequences: int, length: int, bridge: bool) -> dict:
    """Median time of the upper layers (every-projection LoRA, a distinct tenant per sequence) on one torch thread,
    and the rate of a large matmul, in this process."""
    import torch

    from hmi.bench.systems import tenant_adapter
    from models.bridge import BridgeShape, DomainBridge, apply_bridges
    from models.dims import ModelDims
    from models.encoder import EncoderModel
    from models.lora import LoRAWeights
    from models.packing import PackedLayout, pack_inputs, plot_rows
    torch.set_num_threads(1)
    dims = ModelDims.from_dir(model_dir)
    model = EncoderModel(model_dir, torch.device("cpu"))
    adapters = [tenant_adapter(dims, i, split_layer) for i in range(sequences)]
    keys = list(adapters[0].lora)
    a = {k: torch.stack([ad.lora[k][0] for ad in adapters]) for k in keys}
    b = {k: torch.stack([ad.lora[k][1] * ad.scaling for ad in adapters]) for k in keys}
    lora = LoRAWeights(a, b)
    shape = BridgeShape(hidden=dims.hidden)
    domain_bridge = DomainBridge(shape)
    domain_bridge.init_random(torch.Generator().manual_seed(0))
    domain_bridge.eval()
    layout = PackedLayout.of([split_layer] * sequences, list(range(sequences)), [length] * sequences)
    rows = {j: np.random.default_rng(j).standard_normal((length, dims.hidden)).astype(np.float16)
            for j in range(sequences)}

    def run() -> None:
        staged = plot_rows(layout, lambda j: rows[layout.order[j]])
        inputs = pack_inputs(layout, hidden_size=dims.hidden, device=torch.device("cpu"), embed=model.embed,
                             token_ids_of=lambda j: None, first_position_of=lambda j: 0, plot=staged)
        if bridge:
            apply_bridges(inputs.hidden, layout, lambda j: domain_bridge)
        model.run(inputs, lora)

    with torch.inference_mode():
        for _ in range(3):
            run()
        times = []
        for _ in range(15):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        big, weight = torch.randn(2048, 1024), torch.randn(1024, 1024)
        for _ in range(3):
            big @ weight
        started = time.perf_counter()
        for _ in range(10):
            big @ weight
        mm_rate = 2 * 2048 * 1024 * 1024 * 10 / (time.perf_counter() - started)
    tokens = sequences * length
    lora_flops = sum(2 * a[k].shape[1] * (a[k].shape[2] + b[k].shape[1]) for k in keys)
    flops = flops_per_token(dims, split_layer, lora_flops, bridge) * tokens
    seconds = float(np.median(times))
    return {"sequences": sequences, "tokens": tokens, "ms": seconds * 1e3, "gflops": flops / seconds / 1e9,
            "mm_gflops": mm_rate / 1e9, "share_of_mm": flops / seconds / mm_rate}


def plot(report: dict, path: Path) -> None:
    """Left: CPU per request by process. Right: the upper layers' GFLOP/s by batch against a large matmul."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(report["cpu_ms_per_request"])
    left.bar(names, [report["cpu_ms_per_request"][n] for n in names], color="tab:blue")
    left.set_ylabel("CPU ms per request")
    left.set_title(f"{report['requests_per_s']:.0f} requests/s, {report['sequences_per_batch']:.1f} sequences/batch")
    rows = report["upper_layers_alone"] + [report["upper_layers_alone_long"]]
    labels = [f"{r['sequences']}x{r['tokens'] // r['sequences']}" for r in rows]
    right.bar(labels, [r["gflops"] for r in rows], color="tab:green", label="upper layers + bridge + LoRA")
    right.axhline(rows[0]["mm_gflops"], color="black", linestyle="--", label="large torch.mm")
    right.axhline(report["execution_gflops"], color="tab:red", linestyle=":", label="compute, served (per thread)")
    right.set_ylabel("GFLOP/s (one torch thread)")
    right.set_xlabel("sequences x tokens")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--bridge-steps", type=int, default=40,
                        help="distillation steps (serving speed does not depend on them)")
    parser.add_argument("--corpus", type=Path, help="texts of the requests and of the PLOT (default: the demo corpus); "
                        "a .jsonl data set gives its \"text\" fields")
    parser.add_argument("--max-tokens", type=int, default=128, help="texts are cut to this many tokens")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", action="store_true",
                        help="keep the services' data and logs (their folder is printed)")
    args = parser.parse_args()

    from hmi.bench.systems import LABELS, tenant_adapter
    from hmi.bench.workload import DEMO_CORPUS, load_texts
    from hmi.launcher import ServiceSet
    from models.adapter_format import serialize_adapter
    from models.dims import ModelDims
    from models.split_defaults import default_split
    from services.common.model_specs import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    dims = ModelDims.from_dir(model_dir)
    split = default_split(dims)
    corpus = args.corpus or DEMO_CORPUS
    texts = load_texts(corpus)
    folder = Path(tempfile.mkdtemp(prefix="hmi-profile-"))
    services = ServiceSet.on_free_ports(folder, model=str(model_dir), log_dir=folder / "logs",
                                        extra_env={"HMI_MAX_SEQUENCE_TOKENS": str(args.max_tokens)})
    report: dict = {"tenants": args.tenants, "clients": args.clients, "split_layer": split.split_layer}
    try:
        services.start(timeout=300)
        client = services.client(timeout=120)
        client.build_domain("bench", "\n".join(texts), min_count=2, learn_threshold=-1, bridge_steps=args.bridge_steps)
        for tenant in range(args.tenants):
            client.register_tenant(f"t{tenant}", "bench", LABELS,
                                   serialize_adapter(tenant_adapter(dims, tenant, split.split_layer)))
        load(client, args.tenants, corpus, args.clients, 5.0, seed=1)      # warm-up: adapters, caches
        pids = {s.name: s.process.pid for s in services.services if s.process is not None}
        pids["client"] = os.getpid()
        spies = {name: spy(pid, args.duration, folder / f"{name}.raw")
                 for name, pid in pids.items() if name != "client"}
        executed_before = compute_stats(services)
        stage_urls = [services.metrics_url(name) for name in ("gateway", "compute")]
        stages_before = {k: v for url in stage_urls for k, v in stage_sums(url).items()}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}

        started = time.perf_counter()
        latencies = load(client, args.tenants, corpus, args.clients, args.duration, seed=2)
        elapsed = time.perf_counter() - started
        cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        stages_after = {k: v for url in stage_urls for k, v in stage_sums(url).items()}
        stages, stage_seconds = {}, {}
        for key, (total, count) in stages_after.items():
            old_total, old_count = stages_before.get(key, (0.0, 0.0))
            stages[key] = 1e3 * (total - old_total) / max(1, count - old_count)
            stage_seconds[key] = total - old_total
        for process in spies.values():
            if process is not None:
                process.wait(timeout=60)
        requests = len(latencies)
        stats = compute_stats(services)
        tokens = stats.tokens - executed_before.tokens
        batches = stats.batches - executed_before.batches
        execute_seconds = stage_seconds.get("compute_stage_seconds.execute", 0.0)
        report.update({
            "requests_per_s": requests / elapsed, "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3),
            "cpu_ms_per_request": {name: seconds * 1e3 / requests for name, seconds in cpu.items()},
            "machine_busy": sum(cpu.values()) / elapsed / (os.cpu_count() or 1),
            "sequences_per_batch": (stats.sequences - executed_before.sequences) / max(1, batches),
            "tokens_per_request": tokens / max(1, requests),
            # compute's achieved rate while a batch executes (each execution thread runs one torch thread)
            "execution_gflops": tokens * flops_per_token(dims, split.split_layer) / max(1e-9, execute_seconds) / 1e9,
            "stage_ms_per_batch": stages,
            "top": {name: top_functions(folder / f"{name}.raw", args.top) for name in spies}})
        client.close()
    finally:
        services.stop()
    length = max(1, round(report["tokens_per_request"]))
    report["upper_layers_alone"] = [upper_layers_alone(model_dir, split.split_layer, n, length, split.bridge)
                                    for n in (4, 8, 16)]
    report["upper_layers_alone_long"] = upper_layers_alone(model_dir, split.split_layer, 8, 128, split.bridge)

    print(f"\n{report['requests_per_s']:.1f} requests/s, p50 {report['p50_ms']:.0f} ms, p99 {report['p99_ms']:.0f} ms, "
          f"{report['sequences_per_batch']:.1f} sequences per batch, {report['tokens_per_request']:.1f} tokens per "
          f"request, machine {report['machine_busy']:.0%} busy; compute executes at {report['execution_gflops']:.1f} "
          f"GFLOP/s per execution thread")
    print("\n| stage (per batch) | ms |\n| --- | --- |")
    for stage, ms in report["stage_ms_per_batch"].items():
        print(f"| {stage} | {ms:.1f} |")
    print("\n| process | CPU ms per request |\n| --- | --- |")
    for name, ms in report["cpu_ms_per_request"].items():
        print(f"| {name} | {ms:.2f} |")
    for name, rows in report["top"].items():
        print(f"\n{name}: busy samples by innermost function")
        for function, share in rows:
            print(f"  {share:6.1%}  {function}")
    print("\n| upper layers alone | tokens | ms | GFLOP/s | of large mm |\n| --- | --- | --- | --- | --- |")
    for row in report["upper_layers_alone"] + [report["upper_layers_alone_long"]]:
        print(f"| {row['sequences']} sequences | {row['tokens']} | {row['ms']:.1f} | {row['gflops']:.1f} | "
              f"{row['share_of_mm']:.0%} of {row['mm_gflops']:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        plot(report, args.out.with_suffix(".png"))
    if args.keep:
        print(f"services' data and logs: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
