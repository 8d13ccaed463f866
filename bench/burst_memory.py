"""Does every service give its memory back after a burst? Warm-up, then a burst of fat requests (closed loops
of many-text Classify calls) and oversized HTTP bodies, then quiet: each service's RSS must come back to
within 10 % of what it was after warm-up.

    .venv/bin/python bench/burst_memory.py --out bench/results/burst-memory.json

It starts the three services (real packaged MiniLM by default, HTTP door on) as `hmi up` would, builds a
domain from the demo corpus and registers one tenant; warms up with `--clients` closed loops of one-text
requests for `--warmup` seconds; bursts for `--burst` seconds (`--fat-threads` closed loops of
`--fat-texts`-text requests, plus `--big-bodies` HTTP bodies of `--body-mib` MiB that the gateway must refuse
unread past its limit); then stays quiet for `--quiet` seconds, sampling every service's RSS (/proc) each
second throughout. Prints a table, writes FILE.json and FILE.png (RSS per service over time).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.soak import rss_bytes  # noqa: E402
from hmi.bench.workload import DEMO_CORPUS, load_texts  # noqa: E402
from hmi.client import HMIClient  # noqa: E402
from hmi.launcher import ServiceSet  # noqa: E402

TARGET = 1.10       # RSS after the quiet phase, at most this times the RSS after warm-up


def loops(address: str, token: str, texts: list[str], threads: int, per_request: int, seconds: float) -> int:
    """Closed loops of `per_request`-text Classify calls; returns the calls answered."""
    done = [0] * threads
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        with HMIClient(address, timeout=60, retries=0, token=token) as client:
            while time.monotonic() < stop:
                start = (index * 7919 + done[index] * per_request) % len(texts)
                batch = [texts[(start + i) % len(texts)] for i in range(per_request)]
                try:
                    client.classify("burst", batch)
                    done[index] += 1
                except Exception:      # noqa: BLE001 - overload answers are part of a burst
                    time.sleep(0.01)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done)


def big_body(http_addr: str, token: str, mib: float) -> int:
    """POSTs an oversized JSON body; returns the HTTP status (413 expected)."""
    body = b'{"model": "burst", "input": "' + b"a" * int(mib * 2**20) + b'"}'
    connection = http.client.HTTPConnection(http_addr, timeout=120)
    try:
        connection.request("POST", "/v1/classify", body=body,
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        return connection.getresponse().status
    except OSError:
        return 0            # the gateway closed the connection while the body was still being sent
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--split-layer", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8, help="closed loops of the warm-up")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--burst", type=float, default=30.0)
    parser.add_argument("--fat-threads", type=int, default=8)
    parser.add_argument("--fat-texts", type=int, default=64)
    parser.add_argument("--big-bodies", type=int, default=3)
    parser.add_argument("--body-mib", type=float, default=30.0)
    parser.add_argument("--quiet", type=float, default=90.0)
    parser.add_argument("--corpus", type=Path, default=DEMO_CORPUS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    texts = load_texts(args.corpus)
    data_dir = Path(tempfile.mkdtemp(prefix="hmi-burst-"))
    services = ServiceSet.on_free_ports(data_dir, model=args.model,
                                        log_dir=args.out.with_suffix("").with_name(args.out.stem + "-logs"))
    services.start(timeout=300)
    samples: list[dict] = []
    stop = threading.Event()
    began = time.monotonic()
    marks: dict[str, float] = {}
    try:
        pids = {s.name: s.process.pid for s in services.services}
        token = services.admin_token or ""

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append({"t": time.monotonic() - began,
                                "rss_mib": {name: rss_bytes(pid) / 2**20 for name, pid in pids.items()}})

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with services.client(timeout=600) as admin:
            admin.build_domain("burst", "\n".join(texts), split_layer=args.split_layer, context=1, min_count=2)
            admin.register_tenant("burst", "burst", ["neg", "pos"], seed=1)
        print(f"warm-up: {args.clients} closed loops of one text, {args.warmup:.0f} s", flush=True)
        loops(services.gateway_addr, token, texts, args.clients, 1, args.warmup)
        time.sleep(35.0)      # one trimming interval: the warmed-up size, not the warm-up's transient
        marks["warmed"] = time.monotonic() - began
        warmed = {name: rss_bytes(pid) / 2**20 for name, pid in pids.items()}
        print(f"burst: {args.fat_threads} x {args.fat_texts} texts per request and {args.big_bodies} bodies of "
              f"{args.body_mib:g} MiB, {args.burst:.0f} s", flush=True)
        statuses: list[int] = []
        bodies = threading.Thread(target=lambda: statuses.extend(
            big_body(services.http_addr, token, args.body_mib) for _ in range(args.big_bodies)))
        bodies.start()
        answered = loops(services.gateway_addr, token, texts, args.fat_threads, args.fat_texts, args.burst)
        bodies.join()
        marks["burst_end"] = time.monotonic() - began
        print(f"quiet: {args.quiet:.0f} s", flush=True)
        time.sleep(args.quiet)
        end = {name: rss_bytes(pid) / 2**20 for name, pid in pids.items()}
    finally:
        stop.set()
        services.stop()
    peak = {name: max(s["rss_mib"][name] for s in samples if marks["warmed"] <= s["t"] <= marks["burst_end"])
            for name in warmed}
    rows = {name: {"after_warmup_mib": warmed[name], "burst_peak_mib": peak[name], "after_quiet_mib": end[name],
                   "ratio": end[name] / warmed[name] if warmed[name] else None} for name in warmed}
    print(f"\nburst: {answered} requests of {args.fat_texts} texts answered; big bodies answered {statuses}\n")
    print("| service | RSS after warm-up MiB | burst peak MiB | after quiet MiB | after / warm-up | within 10 % |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['after_warmup_mib']:.0f} | {row['burst_peak_mib']:.0f} | {row['after_quiet_mib']:.0f} "
              f"| {row['ratio']:.2f} | {'yes' if row['ratio'] <= TARGET else 'no'} |")
    report = {"machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)", "model": args.model,
              "marks": marks, "answered": answered, "big_body_statuses": statuses, "services": rows,
              "samples": samples}
    args.out.write_text(json.dumps(report, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(8, 4))
    for name in warmed:
        axis.plot([s["t"] for s in samples], [s["rss_mib"][name] for s in samples], label=name)
    for label, at in marks.items():
        axis.axvline(at, color="grey", linestyle=":")
        axis.text(at, axis.get_ylim()[1], label, fontsize=8, va="top")
    axis.set_xlabel("seconds")
    axis.set_ylabel("RSS (MiB)")
    axis.legend()
    axis.set_title("RSS through warm-up, burst and quiet")
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if all(row["ratio"] <= TARGET for row in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
