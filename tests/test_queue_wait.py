"""The batcher refuses at once what would outwait its deadline in the queue (no services needed)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from services.common.errors import LimitExceeded
from services.gateway.batcher import Batcher, BatcherSettings, SequenceWork
from services.gateway.directory import TenantRoute
from services.gateway.queue_wait import DrainRate, expected_wait, tokens_ahead
from services.gateway.router import Router


def test_drain_rate_counts_only_windows_that_stayed_backlogged():
    rate = DrainRate(window_s=1.0, _start=0.0)
    rate.answered(100, backlogged=False, now=0.5)
    rate.answered(100, backlogged=True, now=1.0)       # the window closes: the queue ran dry in it
    assert rate.rate == 0.0
    rate.answered(300, backlogged=True, now=1.5)
    rate.answered(300, backlogged=True, now=2.0)
    assert rate.rate == pytest.approx(600.0)
    rate.answered(200, backlogged=True, now=3.0)
    assert rate.rate == pytest.approx(400.0)            # smoothed: half the old, half the new


def test_tokens_ahead_is_bounded_by_the_fair_share_and_by_all_queued():
    # A flood of 10,000 tokens and a newcomer's 10 tokens: fair queuing serves 10 of the flood's before them.
    assert tokens_ahead(10_000, 0, 10, backlogged=2, weight=1.0) == 20
    assert tokens_ahead(10_000, 9_000, 1_000, backlogged=2, weight=1.0) == 11_000     # all of it
    assert tokens_ahead(10_000, 0, 10, backlogged=2, weight=2.0) == 10                 # twice the share
    assert expected_wait(500, 0.0) is None and expected_wait(500, 250.0) == 2.0


def work(tenant: str, tokens: int, seconds: float) -> SequenceWork:
    route = TenantRoute(tenant, ("a", "b"), 1, "d", 0)
    return SequenceWork(np.arange(tokens, dtype=np.int32), route, time.monotonic() + seconds, False)


def test_a_request_that_would_outwait_its_deadline_is_refused_with_a_retry_hint():
    router = Router(["127.0.0.1:1"], inflight_per_replica=0)    # nothing leaves: the queue only fills
    batcher = Batcher(router, BatcherSettings(max_wait_ms=1, max_batch_tokens=100))
    batcher._drain.rate = 1_000.0           # as measured: compute drains 1,000 tokens/s
    try:
        batcher.submit([work("flood", 100, 30) for _ in range(30)])     # 3,000 tokens queued
        time.sleep(0.05)
        batcher.submit([work("light", 10, 1)])      # 20 tokens ahead under fair order: 0.02 s, queued
        with pytest.raises(LimitExceeded, match="would wait about 3.0 s") as refused:
            batcher.submit([work("flood", 100, 1)])     # behind its own 2,800 and the light 10: 3.0 s > 1 s
        assert refused.value.limit == "queue_wait" and 1.5 < refused.value.retry_after < 2.5
        batcher.submit([work("flood", 100, 30)])        # a deadline long enough: queued
    finally:
        router.replicas[0].capacity = 1
        batcher.close()
