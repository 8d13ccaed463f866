"""Chaos (`make chaos`, not part of `make test`): under steady classification and registration load, each
service in turn is killed with SIGKILL and restarted. Every acknowledged write survives, no request outlives
its deadline, and the failed requests are counted and reported."""
from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter

import grpc
import pytest

from tests.conftest import start_services

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
DEADLINE = 3.0            # seconds per classification
SLACK = 1.0               # what a call may take beyond its deadline (scheduling on 2 busy cores)
TEXTS = ["the service was quick", "I would like a refund", "sunny all weekend"]


def test_kill_each_service_under_load(tmp_path, tiny_model_dir):
    services = start_services(tmp_path / "data", tiny_model_dir)
    stop = threading.Event()
    outcomes: Counter = Counter()
    slowest = [0.0]
    acknowledged: dict[str, int] = {}
    lock = threading.Lock()

    def note(kind: str, started: float) -> None:
        with lock:
            outcomes[kind] += 1
            slowest[0] = max(slowest[0], time.monotonic() - started)

    def classifier(index: int) -> None:
        with services.client(timeout=DEADLINE) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.classify(f"chaos-{index % 4}", TEXTS, timeout=DEADLINE)
                    note("classify ok", started)
                except grpc.RpcError as error:
                    note(f"classify {error.code().name}", started)
                    time.sleep(0.05)

    def writer() -> None:
        with services.client(timeout=DEADLINE) as client:
            count = 0
            while not stop.is_set():
                tenant = f"written-{count}"
                started = time.monotonic()
                try:
                    version = client.register_tenant(tenant, "chaos", ["a", "b"], rank=2).adapter_version
                    with lock:
                        acknowledged[tenant] = version
                    note("register ok", started)
                except grpc.RpcError as error:
                    note(f"register {error.code().name}", started)
                    time.sleep(0.05)
                count += 1

    try:
        with services.client(timeout=30) as client:
            client.build_domain("chaos", "", split_layer=0, context=1, min_count=1)
            for index in range(4):
                client.register_tenant(f"chaos-{index}", "chaos", ["a", "b"], seed=index + 1)
        threads = [threading.Thread(target=classifier, args=(i,)) for i in range(3)] + [threading.Thread(
            target=writer)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        for name in ("store", "compute", "gateway"):
            services.stop([name], sig=signal.SIGKILL)
            time.sleep(1)
            services.start(only=[name])
            time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        with services.client(timeout=30) as client:
            lost = {t: v for t, v in acknowledged.items()
                    if client.get_tenant(t).adapter_version != v}
            assert client.classify("chaos-0", TEXTS)[0].label in ("a", "b")
    finally:
        stop.set()
        services.stop()
    report = {"outcomes": dict(outcomes), "acknowledged_writes": len(acknowledged), "lost_writes": len(lost),
              "slowest_call_s": round(slowest[0], 3), "deadline_s": DEADLINE}
    print("chaos report:", json.dumps(report))
    (tmp_path / "chaos-report.json").write_text(json.dumps(report))
    assert not lost, f"acknowledged writes lost: {list(lost)[:5]}"
    assert len(acknowledged) > 20 and outcomes["classify ok"] > 50
    assert slowest[0] <= DEADLINE + SLACK, f"a call took {slowest[0]:.2f}s, past its {DEADLINE}s deadline"
