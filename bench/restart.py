"""Restart benchmark: what a compute restart costs clients under `hmi up` (the real CLI and its supervisor).

    .venv/bin/python bench/restart.py --out bench/results/restart.json

For each replica count in `--computes` (default 1 and 2) it starts `hmi up` with the packaged MiniLM (or
`--model`), registers a tenant, runs `--clients` closed-loop clients classifying with a `--deadline` second
deadline, kills compute replica 0 with SIGKILL after `--kill-at` seconds and keeps the load on for
`--duration` seconds in all. Reports failed requests by status code, the longest time without any answered
request ("outage"), the slowest request, and how long `hmi up` took to bring the replica back to SERVING.
Writes FILE.json and FILE.png (answers per 0.25 s, the kill marked).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hmi.client import HMIClient, is_serving  # noqa: E402
from hmi.launcher import free_port, hmi_command, serving_children  # noqa: E402
from hmi_client.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402

TEXTS = ["the service was quick and friendly", "I would like a refund for my order"]


def run_once(model: str, computes: int, args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="hmi-restart-"))
    gateway = f"127.0.0.1:{free_port()}"
    up = subprocess.Popen(hmi_command() + ["up", "--model", model, "--gateway", gateway, "--http", "off",
                                           "--computes", str(computes), "--data-dir", str(root / "data"),
                                           "--log-dir", str(root / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "HMI_TORCH_THREADS": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line.rstrip()) for line in up.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("HMI is ready") for line in lines):
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("hmi up did not start:\n" + "\n".join(lines))
            time.sleep(0.2)
        token = (root / "data" / "admin.token").read_text(encoding="utf-8").strip()   # written by hmi up
        with HMIClient(gateway, timeout=120, token=token) as client:
            client.build_domain("restart", "", split_layer=0, context=1, min_count=1)
            client.register_tenant("restart-critic", "restart", ["neg", "pos"], seed=1)
            client.classify("restart-critic", TEXTS)
        events: list[tuple[float, float, str]] = []        # (sent, answered, code), seconds since start
        stop = threading.Event()
        started = time.monotonic()

        def client_loop() -> None:
            with grpc.insecure_channel(gateway) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        stub.Classify(gateway_pb2.ClassifyRequest(tenant_id="restart-critic", texts=TEXTS),
                                      timeout=args.deadline, metadata=(("authorization", f"Bearer {token}"),))
                        code = "OK"
                    except grpc.RpcError as error:
                        code = error.code().name
                    events.append((sent - started, time.monotonic() - started, code))

        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        time.sleep(args.kill_at)
        victim, pid = sorted((k, v) for k, v in serving_children(up.pid).items() if k.startswith("compute@"))[0]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic() - started
        back = None
        while time.monotonic() - started < args.duration:
            if back is None:
                new = serving_children(up.pid).get(victim)
                if new and new != pid and is_serving(victim.split("@")[1], timeout=0.5):
                    back = time.monotonic() - started
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(timeout=args.deadline + 5)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
    answered = sorted(end for _, end, code in events if code == "OK")
    window = [killed] + [t for t in answered if t >= killed]
    outage = max((b - a for a, b in zip(window, window[1:])), default=float("nan"))
    return {"computes": computes, "clients": args.clients, "deadline_s": args.deadline, "killed_at_s": killed,
            "back_serving_after_s": None if back is None else back - killed,
            "requests": len(events), "codes": dict(Counter(code for *_, code in events)),
            "failed": sum(code != "OK" for *_, code in events), "outage_s": outage,
            "slowest_s": max(end - sent for sent, end, _ in events),
            "answers": answered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--computes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=30.0)
    parser.add_argument("--kill-at", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--out", default="bench/results/restart.json")
    args = parser.parse_args()
    runs = [run_once(args.model, n, args) for n in args.computes]
    print(f"{'replicas':>8} {'requests':>9} {'failed':>7} {'outage s':>9} {'slowest s':>10} {'back after s':>13}")
    for run in runs:
        back = run["back_serving_after_s"]
        print(f"{run['computes']:>8} {run['requests']:>9} {run['failed']:>7} {run['outage_s']:>9.2f} "
              f"{run['slowest_s']:>10.2f} {'-' if back is None else f'{back:.1f}':>13}  codes {run['codes']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "model": args.model,
                               "runs": runs}, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs)), sharex=True, squeeze=False)
    for axis, run in zip(axes[:, 0], runs):
        bins = [0] * (int(args.duration / 0.25) + 1)
        for t in run["answers"]:
            bins[min(len(bins) - 1, int(t / 0.25))] += 1
        axis.step([i * 0.25 for i in range(len(bins))], [b / 0.25 for b in bins], where="post")
        axis.axvline(run["killed_at_s"], color="red", linestyle="--", label="compute-0 killed (SIGKILL)")
        if run["back_serving_after_s"] is not None:
            axis.axvline(run["killed_at_s"] + run["back_serving_after_s"], color="green", linestyle=":",
                         label="restarted replica SERVING")
        axis.set_ylabel("answers/s")
        axis.set_title(f"{run['computes']} compute replica(s), {run['clients']} clients: {run['failed']} failed, "
                       f"longest gap {run['outage_s']:.1f} s", fontsize=9)
        axis.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
