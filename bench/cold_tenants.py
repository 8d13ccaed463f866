"""What a tenant's first request costs, process by process, against a request to a tenant already warm.

Starts the three services (real processes, real gRPC), builds a domain from the demo corpus at the model's
default split, registers 2N + 16 tenants with `hmi bench`'s adapters, warms 16 of them, then alternates
phases of N one-text Classify requests from 16 closed-loop clients: *warm* phases go to the 16 warm tenants,
*cold* phases each to N tenants never asked before (compute fetches, parses and loads each adapter from the
store). Around each phase it reads every process's CPU time from /proc, split into user and system time,
and compute's voluntary context switches (each a thread that went to sleep waiting: for the GIL, mostly).
With 10,000 tenants, about 40 % of a 30 s run's requests go to such a tenant, so this is where many tenants
cost throughput.

    python bench/cold_tenants.py --tenants 300 --out bench/results/cold-tenants.json

Writes FILE.json and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CLOCK = os.sysconf("SC_CLK_TCK")


def task_times(pid: int) -> dict[int, tuple[float, float, int]]:
    """Per thread of a process: user seconds, system seconds, voluntary context switches."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            switches = next((int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                             if line.startswith("voluntary_ctxt_switches")), 0)
        except OSError:
            continue      # the thread ended
        out[int(task.name)] = (int(fields[11]) / CLOCK, int(fields[12]) / CLOCK, switches)
    return out


def process_times(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK, int(fields[12]) / CLOCK


class Phase:
    """CPU of every process over one phase, per request."""

    def __init__(self, pids: dict[str, int], compute_pid: int) -> None:
        self.pids, self.compute_pid = pids, compute_pid

    def __enter__(self) -> "Phase":
        self.before = {name: process_times(pid) for name, pid in self.pids.items()}
        self.tasks_before = task_times(self.compute_pid)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.after = {name: process_times(pid) for name, pid in self.pids.items()}
        self.tasks_after = task_times(self.compute_pid)

    def report(self, requests: int) -> dict:
        per = 1e3 / requests
        cpu = {name: (sum(self.after[name]) - sum(self.before[name])) * per for name in self.pids}
        system = {name: (self.after[name][1] - self.before[name][1]) * per for name in self.pids}
        switches = sum(self.tasks_after[t][2] - self.tasks_before.get(t, (0, 0, 0))[2] for t in self.tasks_after)
        return {"requests_per_s": requests / self.seconds, "cpu_ms_per_request": cpu,
                "system_ms_per_request": system,
                "compute_context_switches_per_request": switches / requests}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4))
    phases = report["phases"]
    names = list(phases[0]["cpu_ms_per_request"])
    bottom = [0.0] * len(phases)
    for name in names:
        values = [p["cpu_ms_per_request"][name] for p in phases]
        axis.bar(range(len(phases)), values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_xticks(range(len(phases)), [f"{p['phase']}\n{p['requests_per_s']:.0f} req/s" for p in phases])
    axis.set_ylabel("CPU ms per request")
    axis.set_title("first request of a tenant (cold) against a warm tenant's")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=300, help="requests per phase (cold phases: as many tenants)")
    parser.add_argument("--rounds", type=int, default=2, help="warm-then-cold rounds")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--out", type=Path)
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
    texts = load_texts(DEMO_CORPUS)
    folder = Path(tempfile.mkdtemp(prefix="hmi-cold-"))
    services = ServiceSet.on_free_ports(folder, model=str(model_dir), log_dir=folder / "logs")
    n, warm_tenants = args.tenants, 16
    total = args.rounds * n + warm_tenants
    report: dict = {"tenants_per_cold_phase": n, "clients": args.clients, "split_layer": split.split_layer,
                    "phases": []}
    try:
        services.start(timeout=300)
        client = services.client(timeout=120)
        client.build_domain("bench", "\n".join(texts), min_count=2, learn_threshold=-1, bridge_steps=40)
        for tenant in range(total):
            client.register_tenant(f"t{tenant}", "bench", LABELS,
                                   serialize_adapter(tenant_adapter(dims, tenant, split.split_layer)))
        pids = {s.name: s.process.pid for s in services.services if s.process is not None}
        pids["client"] = os.getpid()
        pool = ThreadPoolExecutor(args.clients)

        def run(tenants: list[int]) -> None:
            list(pool.map(lambda i: client.classify(f"t{tenants[i]}", [texts[i % len(texts)]], truncate=True),
                          range(len(tenants))))

        warm = [args.rounds * n + i % warm_tenants for i in range(n)]
        run(warm * 2)                                   # the warm tenants' adapters, rows and records in place
        for round_index in range(args.rounds):
            for phase, tenants in (("warm", warm), ("cold", list(range(round_index * n, (round_index + 1) * n)))):
                with Phase(pids, pids["compute"]) as measured:
                    run(tenants)
                row = {"phase": phase, **measured.report(len(tenants))}
                report["phases"].append(row)
                print(f"{phase}: {row['requests_per_s']:.1f} requests/s, CPU ms per request "
                      + " ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_request"].items())
                      + f", compute system {row['system_ms_per_request']['compute']:.2f}, compute context switches "
                      f"{row['compute_context_switches_per_request']:.0f}", flush=True)
        client.close()
    finally:
        services.stop()
        shutil.rmtree(folder, ignore_errors=True)

    print("\n| phase | requests/s | CPU ms per request: store / compute / gateway / client | compute system ms "
          "per request | compute context switches per request |\n| --- | --- | --- | --- | --- |")
    for row in report["phases"]:
        cpu = row["cpu_ms_per_request"]
        print(f"| {row['phase']} | {row['requests_per_s']:.1f} | {cpu['store']:.2f} / {cpu['compute']:.2f} / "
              f"{cpu['gateway']:.2f} / {cpu['client']:.2f} | {row['system_ms_per_request']['compute']:.2f} | "
              f"{row['compute_context_switches_per_request']:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
