"""Fairness benchmark: one tenant floods the gateway at 10x capacity while a light tenant sends at a steady low
rate. The light tenant's latency must stay close to what it is on an idle deployment (p99 within 3x) with none
of its requests refused; the heavy tenant's excess is refused with RESOURCE_EXHAUSTED naming its limit.

    .venv/bin/python bench/fairness.py --out bench/results/fairness.json

It starts the three services (real packaged MiniLM by default) as `hmi up` would, with authentication on,
builds a domain, registers `heavy` and `light` and gives each its own API key (so the run also pays for key
checks), measures capacity with a closed loop of `--clients` on the heavy tenant, then runs three phases of
`--seconds` each, the light tenant sending `--light-rps` requests/s (one text each) throughout:

- idle: the light tenant alone (its unloaded latency);
- flood, all refused: the heavy tenant's rps limit is 1, so the flood costs only its refusals (and the flooding
  client's CPU, on the same machine here): what the light tenant pays for the flood's mere arrival;
- flood, rps + concurrency limits: the heavy tenant (limits: rps = `--heavy-share` x capacity, at most
  `--heavy-concurrent` requests in flight) sends Poisson arrivals at `--flood` x capacity from another process;
  what is over its limits is refused before any work;
- flood, concurrency limit only: no rps limit, so the heavy tenant keeps `--heavy-concurrent` requests in the
  gateway's batcher all the time, more than compute can serve: fair queuing decides how long the light tenant
  waits behind them;
- flood, no limits: what happens without any (the gateway's gRPC workers and its queue fill up with the
  heavy tenant's calls, in arrival order, before fair queuing sees them).

Prints a table (p50/p99 of the light tenant, its refusals, the heavy tenant's answers and refusals by limit),
writes FILE.json and FILE.png (the light tenant's latency distribution per phase).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hmi.bench.workload import DEMO_CORPUS, load_texts  # noqa: E402
from hmi.client import HMIClient  # noqa: E402
from hmi.launcher import ServiceSet  # noqa: E402
from hmi_client.v1 import gateway_pb2 as pb  # noqa: E402

PHASES = ("refused", "limited", "concurrent", "unlimited", "fat")


def outcome(error) -> str:
    """OK, or the status code with the limit named in the trailing metadata (RESOURCE_EXHAUSTED:rps)."""
    if error is None:
        return "OK"
    code = error.code().name if hasattr(error, "code") else type(error).__name__
    limit = dict(error.trailing_metadata() or ()).get("hmi-limit", "") if hasattr(error, "trailing_metadata") else ""
    return f"{code}:{limit}" if limit else code


def flood(address: str, token: str, tenant: str, texts: list[str], rate: float, seconds: float, seed: int,
          results, max_outstanding: int = 4000) -> None:
    """Poisson arrivals at `rate` from a process of its own (so its CPU is not the light client's GIL)."""
    rng = np.random.default_rng(seed)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    outstanding = threading.Semaphore(max_outstanding)
    skipped = 0
    with HMIClient(address, timeout=10, retries=0, token=token) as client:
        start = time.monotonic()
        next_at = start
        while next_at - start < seconds:
            next_at += rng.exponential(1.0 / rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not outstanding.acquire(blocking=False):
                skipped += 1                   # the client itself is saturated: not sent
                continue
            future = client.gateway.Classify.future(
                pb.ClassifyRequest(tenant_id=tenant, texts=[texts[int(rng.integers(len(texts)))]]), timeout=10)

            def done(call) -> None:
                try:
                    call.result()
                    name = "OK"
                except Exception as error:  # noqa: BLE001 - every outcome is counted by its code
                    name = outcome(error)
                with lock:
                    counts[name] += 1
                outstanding.release()

            future.add_done_callback(done)
        elapsed = time.monotonic() - start
        for _ in range(max_outstanding):
            outstanding.acquire(timeout=15)
    results.put({"counts": dict(counts), "sent": sum(counts.values()), "skipped": skipped, "seconds": elapsed})


def fat_flood(address: str, token: str, tenant: str, texts: list[str], threads: int, per_request: int,
              seconds: float, seed: int, results) -> None:
    """`threads` closed loops each sending `per_request` texts per Classify, from a process of its own: batches
    full of one tenant, the case where queues after the gateway's (batches in flight, compute's execution
    queue) decide how long the light tenant waits."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        rng = np.random.default_rng(seed + index)
        with HMIClient(address, timeout=10, retries=0, token=token) as client:
            while time.monotonic() < stop:
                batch = [texts[int(i)] for i in rng.integers(len(texts), size=per_request)]
                try:
                    client.classify(tenant, batch)
                    name = "OK"
                except Exception as error:  # noqa: BLE001 - every outcome is counted by its code
                    name = outcome(error)
                    if name.startswith("RESOURCE_EXHAUSTED"):
                        time.sleep(0.05)
                with lock:
                    counts[name] += 1

    started = time.monotonic()
    pool = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    results.put({"counts": dict(counts), "sent": sum(counts.values()), "texts_per_request": per_request,
                 "seconds": time.monotonic() - started})


def light(address: str, token: str, tenant: str, texts: list[str], rate: float, seconds: float) -> dict:
    """Evenly spaced requests, each on its own thread so a slow one does not delay the next one's start."""
    latencies: list[float] = []
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    threads = []
    with HMIClient(address, timeout=10, retries=0, token=token) as client:
        def one(text: str) -> None:
            sent = time.monotonic()
            try:
                client.classify(tenant, [text])
                name = "OK"
            except Exception as error:  # noqa: BLE001 - counted by code
                name = outcome(error)
            with lock:
                counts[name] += 1
                if name == "OK":
                    latencies.append(time.monotonic() - sent)

        start = time.monotonic()
        for index in range(int(rate * seconds)):
            delay = start + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            thread = threading.Thread(target=one, args=(texts[index % len(texts)],))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    array = np.asarray(latencies) * 1e3
    return {"counts": dict(counts), "latencies_ms": array.tolist(),
            "p50_ms": float(np.percentile(array, 50)) if len(array) else None,
            "p99_ms": float(np.percentile(array, 99)) if len(array) else None}


def closed_loop(address: str, token: str, tenant: str, texts: list[str], clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        with HMIClient(address, timeout=30, retries=0, token=token) as client:
            while time.monotonic() < stop:
                client.classify(tenant, [texts[(index * 7919 + done[index]) % len(texts)]])
                done[index] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def run_phase(name: str, services: ServiceSet, keys: dict[str, str], texts: list[str], args, flood_rate: float,
              fat: bool = False):
    print(f"phase {name}: light {args.light_rps:g}/s" + (
        f", heavy sending {args.fat_texts} texts per request from {args.fat_threads} closed loops" if fat
        else f", heavy flooding at {flood_rate:.0f}/s" if flood_rate else ", heavy idle"), flush=True)
    process = None
    results = multiprocessing.get_context("spawn").Queue()
    if fat:
        process = multiprocessing.get_context("spawn").Process(
            target=fat_flood, args=(services.gateway_addr, keys["heavy"], "heavy", texts, args.fat_threads,
                                    args.fat_texts, args.seconds + 2, args.seed, results))
    elif flood_rate:
        process = multiprocessing.get_context("spawn").Process(
            target=flood, args=(services.gateway_addr, keys["heavy"], "heavy", texts, flood_rate, args.seconds + 2,
                                args.seed, results))
    if process is not None:
        process.start()
        time.sleep(2)                        # the flood is on before the light tenant is measured
    measured = light(services.gateway_addr, keys["light"], "light", texts, args.light_rps, args.seconds)
    heavy = results.get(timeout=args.seconds + 60) if process is not None else None
    if process is not None:
        process.join(timeout=30)
    return {"phase": name, "flood_rps": flood_rate, "light": measured, "heavy": heavy}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for phase in report["phases"]:
        latencies = np.sort(phase["light"]["latencies_ms"])
        if len(latencies):
            axis.plot(latencies, np.arange(1, len(latencies) + 1) / len(latencies), label=phase["phase"])
    idle = report["phases"][0]["light"]["p99_ms"]
    if idle:
        axis.axvline(3 * idle, color="gray", linestyle="--", label="3 x idle p99")
    axis.set_xscale("log")
    axis.set_xlabel("light tenant latency (ms)")
    axis.set_ylabel("share of its requests")
    axis.set_title(f"light tenant at {report['light_rps']:g} req/s; heavy tenant at {report['flood']:g}x capacity "
                   f"({report['capacity_rps']:.0f} req/s)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--split-layer", type=int, default=1)
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients measuring capacity")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    parser.add_argument("--light-rps", type=float, default=4.0)
    parser.add_argument("--flood", type=float, default=10.0, help="heavy tenant's offered load, x capacity")
    parser.add_argument("--heavy-share", type=float, default=0.5, help="its rps limit, x capacity")
    parser.add_argument("--heavy-concurrent", type=int, default=16, help="its max_concurrent limit")
    parser.add_argument("--fat-threads", type=int, default=8, help="closed loops of the fat flood")
    parser.add_argument("--fat-texts", type=int, default=64, help="texts per request of the fat flood")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"which phases to run after idle, comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--corpus", type=Path, default=DEMO_CORPUS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    texts = load_texts(args.corpus)
    data_dir = Path(tempfile.mkdtemp(prefix="hmi-fairness-"))
    services = ServiceSet.on_free_ports(data_dir, model=args.model,
                                        log_dir=args.out.with_suffix("").with_name(args.out.stem + "-logs"))
    services.start(timeout=300)
    try:
        with services.client(timeout=600) as admin:
            admin.build_domain("fair", "\n".join(texts), split_layer=args.split_layer, context=1, min_count=2)
            keys = {}
            for index, name in enumerate(("heavy", "light")):
                admin.register_tenant(name, "fair", ["neg", "pos"], seed=index + 1)
                keys[name] = admin.create_key([name], description=f"fairness bench: {name}").secret
            capacity = closed_loop(services.gateway_addr, keys["heavy"], "heavy", texts, args.clients,
                                   args.capacity_seconds)
            print(f"capacity {capacity:.1f} requests/s with {args.clients} clients", flush=True)
            flood_rate = args.flood * capacity
            phases = [run_phase("idle", services, keys, texts, args, 0.0)]
            chosen = [name.strip() for name in args.phases.split(",") if name.strip()]
            unknown = sorted(set(chosen) - set(PHASES))
            if unknown:
                raise SystemExit(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
            rps, concurrent = max(1.0, args.heavy_share * capacity), args.heavy_concurrent
            for name in chosen:
                if name == "refused":
                    admin.set_tenant_limits("heavy", rps=1)
                    title = "flood; heavy limit rps 1 (all refused)"
                elif name == "limited":
                    admin.set_tenant_limits("heavy", rps=rps, max_concurrent=concurrent)
                    title = f"flood; heavy limits rps {rps:.0f}, max_concurrent {concurrent}"
                elif name == "concurrent":
                    admin.set_tenant_limits("heavy", max_concurrent=concurrent)
                    title = f"flood; heavy limit max_concurrent {concurrent}"
                elif name == "unlimited":
                    admin.set_tenant_limits("heavy")
                    title = "flood; heavy without limits"
                else:
                    admin.set_tenant_limits("heavy")
                    title = f"fat flood: {args.fat_threads} x {args.fat_texts} texts, heavy without limits"
                phases.append(run_phase(title, services, keys, texts, args, flood_rate, fat=name == "fat"))
    finally:
        services.stop()
    report = {"machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)", "model": args.model,
              "split_layer": args.split_layer, "capacity_rps": capacity, "flood": args.flood,
              "light_rps": args.light_rps, "seconds": args.seconds, "phases": phases}
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    idle = phases[0]["light"]["p99_ms"]
    print("\n| phase | light p50 ms | light p99 ms | p99 / idle p99 | light refused | heavy answered | "
          "heavy refused (by limit) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for phase in phases:
        measured, heavy = phase["light"], phase["heavy"] or {"counts": {}}
        refused = sum(v for k, v in measured["counts"].items() if k != "OK")
        heavy_refused = ", ".join(f"{k} {v}" for k, v in sorted(heavy["counts"].items()) if k != "OK") or "-"
        ratio = f"{measured['p99_ms'] / idle:.2f}" if idle and measured["p99_ms"] else "-"
        print(f"| {phase['phase']} | {measured['p50_ms'] or 0:.1f} | {measured['p99_ms'] or 0:.1f} | {ratio} | "
              f"{refused} | {heavy['counts'].get('OK', '-')} | {heavy_refused} |")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
