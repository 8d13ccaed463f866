"""Soak benchmark: HMI at a fraction (default 80 %) of its measured capacity for a long time, with tenant churn
(deletions, registrations of new ids and re-registrations of deleted ones with other adapters and labels).
Reports throughput, p50/p99 latency and every service's RSS over time; the RSS must be flat after warm-up.

    .venv/bin/python bench/soak.py --duration 1800 --out bench/results/soak.json       # the full run: 30 minutes
    .venv/bin/python bench/soak.py --duration 240 --out bench/results/soak-short.json  # a short check

It starts the three services (real packaged MiniLM by default) as `hmi up` would, builds a domain, registers
the tenants, measures capacity with a closed loop of `--clients` (which also overloads the services for a
while: memory must come back from that too), then sends Poisson arrivals at `--load` x capacity for
`--duration` seconds while a churn thread replaces `--churn-per-minute` tenants a minute. Every
`--sample-seconds` it records the window's throughput, latency percentiles, errors and each service's RSS
(/proc/PID/status). Prints a summary, writes FILE.json and FILE.png (throughput, p99, RSS per service).
Requests that fail because their tenant was deleted a moment earlier are counted apart ("churn misses");
a re-registered tenant answering with its old label count counts as "stale answers" (must stay 0).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hmi.bench.workload import DEMO_CORPUS, load_texts, zipf_weights  # noqa: E402
from hmi.client import HMIClient  # noqa: E402
from hmi.launcher import ServiceSet  # noqa: E402
from hmi_client.v1 import gateway_pb2 as pb  # noqa: E402


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Tenants:
    """Slots of tenants: slot i keeps its Zipf popularity while churn replaces the tenant in it."""

    def __init__(self, count: int) -> None:
        self.names = [f"soak-{i}" for i in range(count)]
        self.labels = {name: 2 for name in self.names}
        self.retired: list[str] = []            # deleted ids, some registered again later
        self.just_deleted: dict[str, float] = {}
        self.lock = threading.Lock()


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.churn_misses = 0
        self.stale = 0

    def take(self) -> tuple[list[float], int, dict[str, int]]:
        with self.lock:
            window, self.latencies = self.latencies, []
            ok, self.ok = self.ok, 0
            errors, self.errors = self.errors, {}
        return window, ok, errors


def register(client: HMIClient, name: str, labels: int, rank: int, seed: int) -> None:
    client.register_tenant(name, "soak", [f"label{i}" for i in range(labels)], rank=rank, seed=seed)


def closed_loop(address: str, tenants: Tenants, texts: list[str], clients: int, seconds: float, seed: int) -> float:
    """Requests per second of `clients` loops, each sending one request after the other."""
    done = [0] * clients
    stop = time.monotonic() + seconds
    weights = zipf_weights(len(tenants.names), 1.0)

    def loop(index: int) -> None:
        rng = np.random.default_rng(seed + index)
        with HMIClient(address, timeout=30, retries=0) as client:
            while time.monotonic() < stop:
                slot = int(rng.choice(len(weights), p=weights))
                try:
                    client.classify(tenants.names[slot], [texts[int(rng.integers(len(texts)))]])
                    done[index] += 1
                except Exception:  # noqa: BLE001 - counted as not done
                    pass

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


def open_loop(address: str, tenants: Tenants, texts: list[str], rate: float, seconds: float, recorder: Recorder,
              seed: int, max_outstanding: int = 2000) -> None:
    """Poisson arrivals at `rate`; each request is sent asynchronously and timed on completion."""
    rng = np.random.default_rng(seed)
    weights = zipf_weights(len(tenants.names), 1.0)
    outstanding = threading.Semaphore(max_outstanding)
    with HMIClient(address, timeout=10, retries=0) as client:
        start = time.monotonic()
        next_at = start
        while next_at - start < seconds:
            next_at += rng.exponential(1.0 / rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            slot = int(rng.choice(len(weights), p=weights))
            name = tenants.names[slot]
            labels = tenants.labels.get(name, 2)
            if not outstanding.acquire(timeout=10):
                continue
            sent = time.monotonic()
            future = client.gateway.Classify.future(pb.ClassifyRequest(tenant_id=name, texts=[
                texts[int(rng.integers(len(texts)))]]), timeout=10)

            def done(call, name=name, labels=labels, sent=sent) -> None:
                outstanding.release()
                latency = time.monotonic() - sent
                try:
                    reply = call.result()
                except Exception as error:  # noqa: BLE001 - every failure is counted by its code
                    code = error.code().name if hasattr(error, "code") else type(error).__name__
                    with recorder.lock:
                        if code == "NOT_FOUND" and time.monotonic() - tenants.just_deleted.get(name, -1e9) < 5:
                            recorder.churn_misses += 1
                        else:
                            recorder.errors[code] = recorder.errors.get(code, 0) + 1
                    return
                with recorder.lock:
                    recorder.latencies.append(latency)
                    recorder.ok += 1
                    current = tenants.labels.get(name)
                    if current is not None and current == labels and len(reply.results[0].labels) != labels:
                        recorder.stale += 1

            future.add_done_callback(done)
        for _ in range(max_outstanding):      # let the last requests finish before the channel closes
            outstanding.acquire(timeout=15)


def churn(address: str, tenants: Tenants, per_minute: float, stop: threading.Event, rank: int, seed: int,
          counts: dict[str, int]) -> None:
    """Every 60/per_minute s: delete the tenant of a random slot and put a new id there, or a retired id again
    with another adapter and another label count (the stale-model scenario)."""
    rng = random.Random(seed)
    fresh = 0
    with HMIClient(address, timeout=30) as client:
        while not stop.wait(60.0 / per_minute):
            slot = rng.randrange(len(tenants.names))
            old = tenants.names[slot]
            if tenants.retired and rng.random() < 0.3:
                new = tenants.retired.pop(rng.randrange(len(tenants.retired)))
                counts["re-registered"] += 1
            else:
                new = f"soak-new-{fresh}"
                fresh += 1
                counts["new"] += 1
            labels = rng.choice([2, 3, 4])
            try:
                with tenants.lock:
                    tenants.just_deleted[old] = time.monotonic()
                client.delete_tenant(old)
                tenants.retired.append(old)
                tenants.labels.pop(old, None)
                register(client, new, labels, rank, rng.randrange(1, 2**31))
                tenants.labels[new] = labels
                tenants.names[slot] = new
                counts["deleted"] += 1
            except Exception as error:  # noqa: BLE001 - a failed churn step is counted, the soak goes on
                counts["failed"] += 1
                print(f"churn step failed: {error}", file=sys.stderr)


def summarize(samples: list[dict], warmup: float, services: list[str]) -> dict:
    steady = [s for s in samples if s["t"] >= warmup] or samples
    latencies = [s["p99_ms"] for s in steady if s["p99_ms"] is not None]
    summary = {"throughput_rps": float(np.mean([s["throughput_rps"] for s in steady])),
               "p99_ms_median_window": float(np.median(latencies)) if latencies else None,
               "p99_ms_worst_window": float(np.max(latencies)) if latencies else None, "rss": {}}
    minutes = np.array([s["t"] / 60 for s in steady])
    for name in services:
        rss = np.array([s["rss_mib"][name] for s in steady])
        slope = float(np.polyfit(minutes, rss, 1)[0]) if len(steady) > 2 else 0.0
        summary["rss"][name] = {"after_warmup_mib": float(rss[0]), "end_mib": float(rss[-1]),
                                "max_mib": float(rss.max()), "slope_mib_per_hour": 60 * slope}
    return summary


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    samples = report["samples"]
    t = [s["t"] / 60 for s in samples]
    figure, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(t, [s["throughput_rps"] for s in samples], label="answered")
    axes[0].axhline(report["target_rps"], color="gray", linestyle="--", label="offered")
    axes[0].set_ylabel("requests/s")
    axes[0].legend()
    axes[1].plot(t, [s["p99_ms"] or 0 for s in samples], label="p99")
    axes[1].plot(t, [s["p50_ms"] or 0 for s in samples], label="p50")
    axes[1].set_ylabel("latency (ms)")
    axes[1].legend()
    for name in report["services"]:
        axes[2].plot(t, [s["rss_mib"][name] for s in samples], label=name)
    axes[2].axvline(report["warmup_s"] / 60, color="gray", linestyle=":")
    axes[2].set_ylabel("RSS (MiB)")
    axes[2].set_xlabel("minutes of soak")
    axes[2].legend()
    figure.suptitle(f"soak at {report['load']:.0%} of capacity ({report['capacity_rps']:.0f} req/s), "
                    f"{report['churn_per_minute']:.0f} tenants replaced a minute")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--split-layer", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16, help="closed-loop clients measuring capacity")
    parser.add_argument("--capacity-seconds", type=float, default=30.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured capacity offered")
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of soak")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds after which RSS must be flat")
    parser.add_argument("--churn-per-minute", type=float, default=30.0)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--corpus", type=Path, default=DEMO_CORPUS)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    texts = load_texts(args.corpus)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="hmi-soak-"))
    services = ServiceSet.on_free_ports(data_dir, model=args.model, log_dir=args.out.with_suffix("").with_name(
        args.out.stem + "-logs"))
    services.start(timeout=300)
    os.environ["HMI_TOKEN"] = services.admin_token or ""     # every client below acts as the admin
    names = [s.name for s in services.services]
    pids = {s.name: s.process.pid for s in services.services}
    try:
        tenants = Tenants(args.tenants)
        with HMIClient(services.gateway_addr, timeout=600) as client:
            print(f"building the domain (split layer {args.split_layer}) and registering {args.tenants} tenants",
                  flush=True)
            client.build_domain("soak", "\n".join(texts), split_layer=args.split_layer, context=1, min_count=2)
            for index, name in enumerate(tenants.names):
                register(client, name, 2, args.rank, index + 1)
        baseline = {name: rss_bytes(pid) / 2**20 for name, pid in pids.items()}
        capacity = closed_loop(services.gateway_addr, tenants, texts, args.clients, args.capacity_seconds, args.seed)
        target = args.load * capacity
        print(f"capacity {capacity:.1f} requests/s with {args.clients} clients; soaking at {target:.1f}/s for "
              f"{args.duration:.0f}s", flush=True)
        recorder = Recorder()
        stop = threading.Event()
        counts = {"deleted": 0, "new": 0, "re-registered": 0, "failed": 0}
        churner = threading.Thread(target=churn, args=(services.gateway_addr, tenants, args.churn_per_minute, stop,
                                                       args.rank, args.seed, counts), daemon=True)
        sender = threading.Thread(target=open_loop, args=(services.gateway_addr, tenants, texts, target,
                                                          args.duration, recorder, args.seed), daemon=True)
        samples = []
        started = time.monotonic()
        churner.start()
        sender.start()
        while sender.is_alive() or time.monotonic() - started < args.duration:
            time.sleep(args.sample_seconds)
            window, ok, errors = recorder.take()
            now = time.monotonic() - started
            sample = {"t": now, "throughput_rps": ok / args.sample_seconds,
                      "p50_ms": 1e3 * float(np.percentile(window, 50)) if window else None,
                      "p99_ms": 1e3 * float(np.percentile(window, 99)) if window else None,
                      "errors": errors, "rss_mib": {name: rss_bytes(pid) / 2**20 for name, pid in pids.items()}}
            samples.append(sample)
            print(f"{now:6.0f}s {sample['throughput_rps']:6.1f} req/s p99 {sample['p99_ms'] or 0:7.1f} ms "
                  f"errors {errors or '-'} RSS " + " ".join(f"{n} {v:.0f}" for n, v in sample["rss_mib"].items())
                  + " MiB", flush=True)
            if now > args.duration + 15:
                break
        stop.set()
        sender.join(timeout=30)
    finally:
        services.stop()
    report = {"machine": f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores)",
              "model": args.model, "tenants": args.tenants, "split_layer": args.split_layer,
              "capacity_rps": capacity, "load": args.load, "target_rps": target, "duration_s": args.duration,
              "warmup_s": args.warmup, "churn_per_minute": args.churn_per_minute, "churn": counts,
              "churn_misses": recorder.churn_misses, "stale_answers": recorder.stale,
              "errors": {code: sum(s["errors"].get(code, 0) for s in samples)
                         for code in {c for s in samples for c in s["errors"]}},
              "rss_before_capacity_mib": baseline, "services": names,
              "summary": summarize(samples, args.warmup, names), "samples": samples}
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    summary = report["summary"]
    print(f"\nthroughput {summary['throughput_rps']:.1f} req/s (offered {target:.1f}); p99 per window: median "
          f"{summary['p99_ms_median_window']:.0f} ms, worst {summary['p99_ms_worst_window']:.0f} ms; errors "
          f"{report['errors'] or 'none'}; churn {counts}, {recorder.churn_misses} churn misses, "
          f"{recorder.stale} stale answers")
    for name, rss in summary["rss"].items():
        print(f"  {name:8s} RSS {baseline[name]:.0f} MiB before the capacity run, {rss['after_warmup_mib']:.0f} after "
              f"warm-up, {rss['end_mib']:.0f} at the end (max {rss['max_mib']:.0f}; slope "
              f"{rss['slope_mib_per_hour']:+.1f} MiB/h)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
