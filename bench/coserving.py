"""Co-serving benchmark: the same inference workload and the same fine-tuning job, four ways.

    .venv/bin/python bench/coserving.py --load 0.5 --duration 30 --out bench/results/coserving-50.json

It starts the suite as `hmi up` does (packaged MiniLM at the recommended split by default), registers eight
inference tenants and one to tune, measures inference capacity (closed loop), then runs for `--duration`
seconds each:

- inference_alone: Poisson arrivals at `--load` x capacity, one short text per request, from a process of
  its own;
- training_alone: a fine-tuning job (SST-2 from ../shared/datasets/sst2 when it is there) on the idle
  deployment: the dedicated training throughput;
- coserved: both at once, the job trained by compute between inference batches (`--train-part-tokens`);
- separate: the inference load while today's offline trainer (`hmi tenant train`'s code) runs as its own
  process beside the server, on the same machine, with one torch thread as compute's training has.

Training throughput is examples per second over the window (optimizer steps x batch size). Prints a table,
writes FILE.json (runs.<name>.p50_ms / p99_ms / requests_per_s / examples_per_s) and FILE.png. With
`--accuracy N`, also trains a co-served job and an offline run on the first N training examples with one seed
to the end and reports both validation accuracies.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hmi.client import HMIClient  # noqa: E402
from hmi.launcher import ServiceSet  # noqa: E402
from hmi_client.v1 import gateway_pb2 as pb  # noqa: E402
from services.common.model_specs import resolve_model_dir  # noqa: E402

# Children start fresh (spawn), never forked from this process: forking a process that holds live gRPC channels
# can crash the child in gRPC's fork handlers.
SPAWN = multiprocessing.get_context("spawn")

SST2 = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "sst2"
INFERENCE_TENANTS = [f"serve-{i}" for i in range(8)]
RUNS = ("inference_alone", "training_alone", "coserved", "separate")


def dataset(limit: int) -> tuple[list[dict], list[dict]]:
    """SST-2 (train, validation) when it is there; else a small synthetic two-class set."""
    if (SST2 / "train.jsonl").exists():
        read = lambda name: [json.loads(line) for line in (SST2 / name).read_text().splitlines() if line.strip()]  # noqa: E731
        return read("train.jsonl")[:limit], read("validation.jsonl")
    words = (["great", "lovely", "moving", "smart"], ["dull", "awful", "tedious", "flat"])
    rows = [{"text": f"a {words[i % 2][i % 4]} and {words[i % 2][(i // 4) % 4]} film, number {i}",
             "label": ["negative", "positive"][i % 2]} for i in range(limit + 400)]
    return rows[:limit], rows[limit:]


def open_loop(address: str, token: str, texts: list[str], rate: float, seconds: float, seed: int, results) -> None:
    """Poisson arrivals at `rate` (a process of its own, so its CPU is not the measuring process's GIL)."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    pending = []
    with HMIClient(address, timeout=30, retries=0, token=token) as client:
        start = time.monotonic()
        next_at = start
        while next_at - start < seconds:
            next_at += rng.exponential(1.0 / rate)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            request = pb.ClassifyRequest(tenant_id=INFERENCE_TENANTS[int(rng.integers(len(INFERENCE_TENANTS)))],
                                         texts=[texts[int(rng.integers(len(texts)))]])
            future = client.gateway.Classify.future(request, timeout=30)

            def done(call, sent=sent) -> None:
                nonlocal errors
                with lock:
                    if call.exception() is None:
                        latencies.append((time.perf_counter() - sent) * 1e3)
                    else:
                        errors += 1
            future.add_done_callback(done)
            pending.append(future)
        for future in pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - counted by the callback
                pass
        elapsed = time.monotonic() - start
    results.put({"latencies": latencies, "errors": errors, "seconds": elapsed})


def closed_loop(address: str, token: str, texts: list[str], clients: int, seconds: float) -> float:
    count = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(index: int) -> None:
        with HMIClient(address, timeout=30, token=token) as client:
            i = index
            while time.monotonic() < stop:
                client.classify(INFERENCE_TENANTS[i % len(INFERENCE_TENANTS)], [texts[i % len(texts)]])
                i += clients
                with lock:
                    count[0] += 1
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count[0] / seconds


def separate_trainer(address: str, token: str, model_dir: str, domain: str, train_path: str, labels: list[str],
                     batch_size: int, progress_path: str) -> None:
    """Today's offline trainer as its own process: `hmi tenant train`'s code, progress to a file."""
    import torch
    torch.set_num_threads(1)
    from training.tenant_training import train_tenant
    with open(progress_path, "a") as out, HMIClient(address, timeout=600, token=token) as client:
        def progress(step: int, total: int, loss: float) -> None:
            out.write(f"{time.time()} {step}\n")
            out.flush()
        train_tenant(client, Path(model_dir), domain, Path(train_path), None, labels, epochs=1000,
                     batch_size=batch_size, seed=1, progress=progress)


def steps_between(path: Path, start: float, end: float) -> float:
    points = [tuple(map(float, line.split())) for line in path.read_text().splitlines() if line.strip()]
    inside = [step for at, step in points if start <= at <= end]
    return (max(inside) - min(inside)) if len(inside) >= 2 else 0.0


def summary(inference: dict | None, examples_per_s: float | None) -> dict:
    run: dict = {"examples_per_s": examples_per_s}
    if inference is not None:
        latencies = np.asarray(inference["latencies"]) if inference["latencies"] else np.asarray([np.nan])
        run.update(p50_ms=float(np.percentile(latencies, 50)), p99_ms=float(np.percentile(latencies, 99)),
                   requests_per_s=len(inference["latencies"]) / inference["seconds"], errors=inference["errors"])
    else:
        run.update(p50_ms=None, p99_ms=None, requests_per_s=None, errors=0)
    return run


class Bench:
    def __init__(self, services: ServiceSet, admin: HMIClient, texts: list[str], args) -> None:
        self.services, self.admin, self.texts, self.args = services, admin, texts, args

    def inference(self, rate: float, seconds: float):
        results = SPAWN.Queue()
        process = SPAWN.Process(target=open_loop, args=(self.services.gateway_addr,
                                                        self.services.admin_token, self.texts, rate,
                                                        seconds, self.args.seed, results))
        process.start()
        return process, results

    def start_job(self, file_id: str):
        job = self.admin.create_fine_tuning_job("tuned", file_id, epochs=100, steps=1_000_000,
                                                batch_size=self.args.batch_size, seed=1)
        while self.admin.get_fine_tuning_job(job.id).step < 3:
            time.sleep(0.2)
        return job

    def job_rate(self, job_id: str, seconds: float) -> float:
        first, began = self.admin.get_fine_tuning_job(job_id).step, time.monotonic()
        time.sleep(seconds)
        last, ended = self.admin.get_fine_tuning_job(job_id).step, time.monotonic()
        return (last - first) * self.args.batch_size / (ended - began)

    def stop_job(self, job_id: str) -> None:
        self.admin.cancel_fine_tuning_job(job_id)
        self.admin.wait_for_fine_tuning_job(job_id, timeout=120)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in RUNS if runs[n]["p99_ms"] is not None]
    left.bar(names, [runs[n]["p99_ms"] for n in names], color="tab:blue", label="p99")
    left.bar(names, [runs[n]["p50_ms"] for n in names], color="tab:cyan", label="p50")
    left.set_ylabel("inference latency (ms)")
    left.legend()
    names = [n for n in RUNS if runs[n]["examples_per_s"]]
    right.bar(names, [runs[n]["examples_per_s"] for n in names], color="tab:orange")
    right.set_ylabel("training examples / s")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=20)
    figure.suptitle(f"co-serving at {report['load']:.0%} of inference capacity ({report['machine']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--split-layer", type=int, default=-1, help="-1: the model's recommended split")
    parser.add_argument("--load", type=float, default=0.5, help="inference arrivals, x measured capacity")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of each run")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accuracy", type=int, default=0, help="also train N examples to the end, co-served and "
                                                                "offline, and compare validation accuracy")
    parser.add_argument("--accuracy-only", action="store_true", help="skip the four runs (with --accuracy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train, validation = dataset(max(args.train_examples, args.accuracy))
    labels = sorted({row["label"] for row in train})
    texts = [row["text"] for row in validation]
    data_dir = Path(tempfile.mkdtemp(prefix="hmi-coserving-"))
    services = ServiceSet.on_free_ports(data_dir, model=args.model,
                                        log_dir=args.out.with_suffix("").with_name(args.out.stem + "-logs"))
    services.start(timeout=300)
    runs: dict = {}
    accuracy = None
    try:
        with services.client(timeout=600) as admin:
            corpus = "\n".join(row["text"] for row in train[:20000] + validation)
            domain = admin.build_domain("reviews", corpus, split_layer=args.split_layer, min_count=2)
            for index, tenant in enumerate(INFERENCE_TENANTS + ["tuned"]):
                admin.register_tenant(tenant, "reviews", labels, seed=index + 1)
            train_path = data_dir / "train.jsonl"
            train_path.write_text("\n".join(json.dumps(r) for r in train[:args.train_examples]))
            file_id = admin.upload_file(train_path.read_bytes(), "train.jsonl").id
            if args.accuracy_only:
                accuracy = compare_accuracy(services, admin, train[:args.accuracy], validation, labels, data_dir)
                print(json.dumps(accuracy))
                args.out.write_text(json.dumps({"accuracy": accuracy, "split_layer": domain.spec.split_layer},
                                               indent=1))
                return 0
            capacity = closed_loop(services.gateway_addr, services.admin_token, texts, args.clients,
                                   args.capacity_seconds)
            rate = args.load * capacity
            print(f"capacity {capacity:.1f} requests/s; offered load {rate:.1f} requests/s", flush=True)
            bench = Bench(services, admin, texts, args)

            process, results = bench.inference(rate, args.duration)
            runs["inference_alone"] = summary(results.get(), None)
            process.join()

            job = bench.start_job(file_id)
            runs["training_alone"] = summary(None, bench.job_rate(job.id, args.duration))
            bench.stop_job(job.id)

            job = bench.start_job(file_id)
            process, results = bench.inference(rate, args.duration)
            examples = bench.job_rate(job.id, args.duration)
            runs["coserved"] = summary(results.get(), examples)
            process.join()
            bench.stop_job(job.id)

            progress = data_dir / "separate-progress.txt"
            trainer = SPAWN.Process(target=separate_trainer, args=(
                services.gateway_addr, services.admin_token, str(resolve_model_dir(args.model)), "reviews",
                str(train_path), labels, args.batch_size, str(progress)))
            trainer.start()
            while not progress.exists() or len(progress.read_text().splitlines()) < 3:
                time.sleep(0.2)
            began = time.time()
            process, results = bench.inference(rate, args.duration)
            inference = results.get()
            ended = time.time()
            process.join()
            trainer.terminate()
            trainer.join()
            runs["separate"] = summary(inference, steps_between(progress, began, ended) * args.batch_size
                                       / (ended - began))
            if args.accuracy:
                accuracy = compare_accuracy(services, admin, train[:args.accuracy], validation, labels, data_dir)
    finally:
        services.stop()
    alone = runs["inference_alone"]["p99_ms"]
    dedicated = runs["training_alone"]["examples_per_s"]
    for run in runs.values():
        run["p99_vs_alone"] = run["p99_ms"] / alone if run["p99_ms"] else None
        run["training_kept"] = run["examples_per_s"] / dedicated if run["examples_per_s"] else None
    report = {"machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)", "model": args.model,
              "split_layer": domain.spec.split_layer, "capacity_rps": capacity, "load": args.load,
              "offered_rps": rate, "duration": args.duration, "batch_size": args.batch_size,
              "train_examples": args.train_examples, "runs": runs, "accuracy": accuracy}
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))
    print(f"\n{report['machine']}: {args.model} at split {report['split_layer']}, capacity {capacity:.1f} req/s, "
          f"load {args.load:.0%} ({rate:.1f} req/s), {args.duration:.0f} s per run")
    print("| run | inference p50 ms | p99 ms | p99 / alone | requests/s | training examples/s | kept |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    cell = lambda value, spec: format(value, spec) if value is not None else "-"  # noqa: E731
    for name in RUNS:
        run = runs[name]
        print(f"| {name} | {cell(run['p50_ms'], '.1f')} | {cell(run['p99_ms'], '.1f')} | "
              f"{cell(run['p99_vs_alone'], '.2f')} | {cell(run['requests_per_s'], '.1f')} | "
              f"{cell(run['examples_per_s'], '.1f')} | {cell(run['training_kept'], '.0%')} |")
    if accuracy:
        print(f"accuracy on {accuracy['validation']} validation examples: co-served {accuracy['coserved']:.4f}, "
              f"offline {accuracy['offline']:.4f}")
    return 0


def compare_accuracy(services: ServiceSet, admin: HMIClient, train: list[dict], validation: list[dict],
                     labels: list[str], data_dir: Path) -> dict:
    """A co-served job and an offline run on the same data and seed, both to the end; validation accuracy."""
    from training.tenant_training import train_tenant
    train_path, validation_path = data_dir / "accuracy-train.jsonl", data_dir / "accuracy-validation.jsonl"
    train_path.write_text("\n".join(json.dumps(r) for r in train))
    validation_path.write_text("\n".join(json.dumps(r) for r in validation))
    job = admin.create_fine_tuning_job("tuned", admin.upload_file(train_path.read_bytes()).id,
                                       validation_file=admin.upload_file(validation_path.read_bytes()).id, seed=7)
    done = admin.wait_for_fine_tuning_job(job.id, timeout=6 * 3600)
    offline = train_tenant(admin, resolve_model_dir(services.model), "reviews", train_path, validation_path, labels,
                           seed=7)
    return {"train": len(train), "validation": len(validation), "coserved": done.validation_accuracy,
            "offline": offline.eval_accuracy, "job_status": done.status}


if __name__ == "__main__":
    sys.exit(main())
