"""Runs one system under the workload and measures it; `hmi bench` starts one process per system
(`python -m hmi.bench.driver ...`) so each one's peak memory is its own."""
from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from hmi.bench.systems import SYSTEMS, BenchSettings
from hmi.bench.workload import Request, WorkloadSpec, make_requests, sweep_requests


def peak_rss(pid: int | None = None) -> int:
    """Peak resident memory in bytes (VmHWM) of a process; this one by default."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Recorder:
    def __init__(self, max_new_tokens: int = 0) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.tenants: set[int] = set()
        self.errors: list[str] = []
        self.max_new_tokens = max_new_tokens     # > 0: the generation workload
        self.tokens = 0
        self.first_token: list[float] = []       # seconds from arrival to the first token
        self.inter_token: list[float] = []       # seconds between consecutive tokens of a request

    def call(self, system, request: Request, started: float | None = None) -> None:
        begin = time.perf_counter() if started is None else started
        try:
            if self.max_new_tokens:
                generation = system.generate(request.tenant, request.text, self.max_new_tokens)
            else:
                system.classify(request.tenant, [request.text])
        except Exception as error:  # noqa: BLE001 - counted and reported, the run goes on
            with self.lock:
                self.errors.append(f"{type(error).__name__}: {str(error)[:200]}")
            return
        latency = time.perf_counter() - begin
        with self.lock:
            self.latencies.append(latency)
            self.tenants.add(request.tenant)
            if self.max_new_tokens and generation.token_times:
                self.tokens += len(generation.tokens)
                self.first_token.append(generation.token_times[0] - begin)
                times = generation.token_times
                self.inter_token.extend(b - a for a, b in zip(times[:-1], times[1:]))


def closed_loop(system, requests: list[Request], clients: int, duration: float, recorder: Recorder) -> float:
    counter = itertools.count()
    stop_at = time.perf_counter() + duration

    def client() -> None:
        while time.perf_counter() < stop_at:
            recorder.call(system, requests[next(counter) % len(requests)])

    begin = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - begin


def open_loop(system, requests: list[Request], duration: float, recorder: Recorder) -> float:
    """Poisson arrivals: latency counts from the scheduled arrival, so queueing is included."""
    begin = time.perf_counter()
    with ThreadPoolExecutor(max_workers=256) as pool:
        for request in requests:
            if request.at > duration:
                break
            delay = begin + request.at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(recorder.call, system, request, begin + request.at)
    return time.perf_counter() - begin


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def run(system_name: str, spec: WorkloadSpec, settings: BenchSettings, sweep: bool) -> dict:
    started = time.perf_counter()
    generating = spec.task == "generate"
    if generating:
        from hmi.bench.generation_systems import GENERATE_SYSTEMS
        system = GENERATE_SYSTEMS[system_name](settings, spec.tenants)
    else:
        system = SYSTEMS[system_name](settings, spec.tenants)
    new_tokens = spec.max_new_tokens if generating else 0
    setup_seconds = time.perf_counter() - started
    try:
        count = int(spec.rate * spec.duration * 1.2) + 10 if spec.mode == "open" else 200_000
        requests = make_requests(spec, count)
        warm = Recorder(new_tokens)
        for request in requests[:8]:
            warm.call(system, request)
        recorder = Recorder(new_tokens)
        if spec.mode == "open":
            elapsed = open_loop(system, requests, spec.duration, recorder)
        else:
            elapsed = closed_loop(system, requests, spec.clients, spec.duration, recorder)
        result = {
            "system": system_name, "setup_seconds": setup_seconds, "seconds": elapsed,
            "requests": len(recorder.latencies), "errors": len(recorder.errors), "error_samples": recorder.errors[:3],
            "throughput_rps": len(recorder.latencies) / elapsed,
            "p50_ms": 1e3 * statistics.median(recorder.latencies) if recorder.latencies else None,
            "p99_ms": 1e3 * percentile(recorder.latencies, 0.99) if recorder.latencies else None,
            "tenants_served": len(recorder.tenants),
        }
        if generating:
            result.update({
                "tokens_per_s": recorder.tokens / elapsed, "tokens": recorder.tokens,
                "ttft_p50_ms": 1e3 * statistics.median(recorder.first_token) if recorder.first_token else None,
                "ttft_p99_ms": 1e3 * percentile(recorder.first_token, 0.99) if recorder.first_token else None,
                "itl_p50_ms": 1e3 * statistics.median(recorder.inter_token) if recorder.inter_token else None,
                "itl_p99_ms": 1e3 * percentile(recorder.inter_token, 0.99) if recorder.inter_token else None,
            })
        if sweep:
            swept = Recorder(new_tokens)
            begin = time.perf_counter()
            with ThreadPoolExecutor(max_workers=spec.clients) as pool:
                list(pool.map(lambda r: swept.call(system, r), sweep_requests(spec)))
            result.update(sweep_tenants_served=len(swept.tenants), sweep_errors=len(swept.errors),
                          sweep_seconds=time.perf_counter() - begin)
        result["details"] = system.details()
        pids = getattr(system, "service_pids", lambda: {})()
        if pids:
            result["service_peak_rss_bytes"] = {name: peak_rss(pid) for name, pid in pids.items()}
            result["peak_rss_bytes"] = sum(result["service_peak_rss_bytes"].values())
            result["client_peak_rss_bytes"] = peak_rss()
        else:
            result["peak_rss_bytes"] = peak_rss()
        return result
    finally:
        system.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one system of `hmi bench` (started by it)")
    parser.add_argument("--system", required=True, choices=sorted(SYSTEMS))   # generate: peft, hmi
    parser.add_argument("--spec", required=True, help="JSON of the WorkloadSpec")
    parser.add_argument("--settings", required=True, help="JSON of the BenchSettings")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    spec_fields = json.loads(args.spec)
    spec = WorkloadSpec(**{**spec_fields, "corpus": Path(spec_fields["corpus"])})
    settings_fields = json.loads(args.settings)
    settings = BenchSettings(**{**settings_fields, "model_dir": Path(settings_fields["model_dir"]),
                                "corpus": Path(settings_fields["corpus"]) if settings_fields["corpus"] else None,
                                "logs_dir": Path(settings_fields["logs_dir"]) if settings_fields.get("logs_dir")
                                else None})
    torch_threads()
    result = run(args.system, spec, settings, args.sweep)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


def torch_threads() -> None:
    import os

    import torch
    threads = os.environ.get("HMI_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def as_json(value) -> str:
    return json.dumps(asdict(value), default=str)


if __name__ == "__main__":
    sys.exit(main())
