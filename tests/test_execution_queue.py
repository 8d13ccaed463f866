"""Compute's execution queue (no services): batches run in chunks, the chunks of every waiting batch in fair
order across tenants, so a light tenant's batch runs after the chunk executing now, not after a flood's
batches that came before it; results come back whole, failures and cancellations stop a batch."""
from __future__ import annotations

import threading
import time

import pytest

from services.common.errors import Cancelled
from services.common.fair_queue import FairQueue
from services.compute.execution_queue import ExecutionQueue


def test_chunks_hold_at_most_chunk_tokens_in_tag_order():
    queue = ExecutionQueue(1, chunk_tokens=100)
    try:
        chunks = queue.plan(["a"] * 5 + ["b"], [40] * 5 + [30], [1.0] * 6)
        assert all(chunk.tokens <= 100 for chunk in chunks)
        assert sorted(i for chunk in chunks for i in chunk.indices) == list(range(6))
        # b's one sequence starts at virtual time 0 like a's first: it rides in the first chunk, not the last.
        assert 5 in chunks[0].indices
        tags = [chunk.tag for chunk in chunks]
        assert tags == sorted(tags)
        # A sequence longer than a chunk still runs, alone.
        assert [c.indices for c in queue.plan(["c"], [250], [1.0])] == [[0]]
    finally:
        queue.close()


def test_a_light_batch_runs_after_the_chunk_executing_not_after_the_flood():
    queue = ExecutionQueue(1, chunk_tokens=64)
    order: list[tuple[str, int]] = []
    release = threading.Event()

    def runner(name: str, gate: threading.Event | None = None):
        def run(chunk):
            if gate is not None and not order:
                gate.wait(5)              # the first chunk holds the thread until the rest is queued
            order.append((name, len(chunk.indices)))
            return [f"{name}-{i}" for i in chunk.indices]
        return run

    try:
        heavy = [queue.submit(["heavy"] * 16, [32] * 16, [1.0] * 16, runner(f"heavy{n}", release if n == 0 else None))
                 for n in range(3)]
        time.sleep(0.05)
        light = queue.submit(["light"], [8], [1.0], runner("light"))
        release.set()
        assert light.result(timeout=5) and all(h.result(timeout=5) for h in heavy)
    finally:
        queue.close()
    names = [name for name, _ in order]
    assert names.index("light") == 1, names       # behind the one chunk that was executing, of 24 heavy chunks
    assert len(names) == 1 + 3 * 8


def test_weights_give_shares_and_results_come_back_in_chunk_order():
    queue = ExecutionQueue(1, chunk_tokens=10)
    try:
        chunks = queue.plan(["a"] * 6 + ["b"] * 6, [10] * 12, [2.0] * 6 + [1.0] * 6)
        first_six = [i for chunk in chunks[:6] for i in chunk.indices]
        assert sum(i < 6 for i in first_six) == 4, "weight 2 gets twice the tokens of weight 1 while both wait"
        future = queue.submit(["t"] * 3, [6, 6, 6], [1.0] * 3, lambda chunk: list(chunk.indices))
        parts = future.result(timeout=5)
        assert [indices for _, indices in parts] == [[0], [1], [2]]
    finally:
        queue.close()


def test_a_failing_or_unwanted_batch_stops_and_others_run_on():
    queue = ExecutionQueue(2, chunk_tokens=4)
    ran: list[int] = []
    try:
        def fail(chunk):
            raise ValueError("bad batch")
        with pytest.raises(ValueError, match="bad batch"):
            queue.submit(["t"] * 4, [4] * 4, [1.0] * 4, fail).result(timeout=5)
        wanted = threading.Event()
        wanted.set()

        def slow(chunk):
            ran.append(chunk.indices[0])
            wanted.clear()                # the caller goes away after the first chunk
            return None
        stopped = queue.submit(["u"] * 4, [4] * 4, [1.0] * 4, slow, wanted=wanted.is_set)
        with pytest.raises(Cancelled):
            stopped.result(timeout=5)
        assert len(ran) <= 2                  # at most what the two threads had started
        later = queue.submit(["v"], [1], [1.0], lambda chunk: "ok").result(timeout=5)
        assert [result for _, result in later] == ["ok"]
    finally:
        queue.close()


def test_fair_queue_serves_one_flow_out_of_order_and_keeps_the_rest_fair():
    queue: FairQueue[str] = FairQueue()
    for index in range(5):
        queue.push("heavy", f"h{index}", cost=10)
    queue.push("light", "l0", cost=1)
    queue.push("light", "l1", cost=1)
    assert queue.pop_flow("light") == "l0"
    assert queue.pop_flow("nobody") is None
    served = [queue.pop() for _ in range(len(queue))]
    assert sorted(served) == ["h0", "h1", "h2", "h3", "h4", "l1"] and served.index("l1") <= 1
    assert queue.peek() is None and queue.pop() is None
