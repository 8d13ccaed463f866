"""Fair queuing across tenants and per-tenant quotas, as plain Python (no services): a light tenant is served
next whatever a heavy one has queued, weights give shares, and quotas refuse before any work naming the limit."""
from __future__ import annotations

import random

import pytest

from services.common.errors import LimitExceeded
from services.common.fair_queue import FairQueue
from services.gateway.quotas import Limits, Quotas, TokenBucket


def drain(queue: FairQueue) -> list:
    out = []
    while len(queue):
        out.append(queue.pop())
    return out


def test_a_light_flow_is_served_next_whatever_a_heavy_flow_has_queued():
    queue: FairQueue[tuple[str, int]] = FairQueue()
    for index in range(1000):
        queue.push("heavy", ("heavy", index), cost=32)
    for _ in range(10):                      # the heavy flow is being served
        assert queue.pop()[0] == "heavy"
    queue.push("light", ("light", 0), cost=8)
    served = [queue.pop() for _ in range(2)]
    assert ("light", 0) in served, served    # at most one heavy item ahead of it, not the 990 queued
    assert len(queue) == 1000 - 10 - 1 and queue.cost == pytest.approx(32 * len(queue))


def test_items_of_a_flow_keep_their_order_and_nothing_is_lost():
    rng = random.Random(3)
    queue: FairQueue[tuple[str, int]] = FairQueue()
    pushed = {flow: 0 for flow in "abcde"}
    for _ in range(2000):
        flow = rng.choice("abcde")
        queue.push(flow, (flow, pushed[flow]), cost=rng.randint(1, 64), weight=rng.choice([1, 2, 3]))
        pushed[flow] += 1
    served = drain(queue)
    assert sorted(served) == sorted((flow, i) for flow, count in pushed.items() for i in range(count))
    for flow in pushed:
        assert [i for f, i in served if f == flow] == list(range(pushed[flow]))
    assert queue.pop() is None and queue.peek() is None and queue.cost == pytest.approx(0.0)


@pytest.mark.parametrize("weights", [(1, 1), (2, 1), (3, 1)])
def test_backlogged_flows_share_tokens_by_weight(weights):
    queue: FairQueue[tuple[str, int]] = FairQueue()
    costs = {"a": 10, "b": 7}                # unequal item sizes: shares are by tokens, not by items
    for flow, weight in zip("ab", weights):
        for _ in range(3000):
            queue.push(flow, (flow, costs[flow]), cost=costs[flow], weight=weight)
    tokens = {"a": 0, "b": 0}
    for _ in range(1500):                    # both flows stay backlogged throughout
        flow, cost = queue.pop()
        tokens[flow] += cost
    assert tokens["a"] / tokens["b"] == pytest.approx(weights[0] / weights[1], rel=0.03)


def test_remove_where_drops_only_what_it_is_asked_to():
    queue: FairQueue[tuple[str, int]] = FairQueue()
    for index in range(10):
        queue.push("a", ("a", index), cost=1)
        queue.push("b", ("b", index), cost=1)
    removed = queue.remove_where(lambda item: item[1] % 2 == 1)
    assert sorted(removed) == sorted((f, i) for f in "ab" for i in range(1, 10, 2))
    assert len(queue) == 10 and queue.flow_length("a") == 5 and queue.cost == pytest.approx(10)
    served = drain(queue)
    assert [i for f, i in served if f == "a"] == [0, 2, 4, 6, 8]


def test_token_bucket_holds_one_second_and_refills_at_its_rate():
    bucket = TokenBucket(rate=10, now=0.0)
    for _ in range(10):
        assert bucket.take(1, now=0.0) == 0.0
    assert bucket.take(1, now=0.0) == pytest.approx(0.1)          # the wait until one token is back
    assert bucket.take(1, now=0.1) == 0.0
    assert bucket.take(5, now=0.1) == pytest.approx(0.5)
    assert bucket.take(50, now=10.0) == 0.0                        # larger than the bucket: passes when full ...
    assert bucket.take(1, now=10.0) == pytest.approx(4.1)          # ... and leaves it in debt


def test_quotas_refuse_over_the_limit_naming_it_and_release_slots():
    quotas = Quotas()
    limits = Limits(max_concurrent=2)
    first, second = quotas.admit("t", limits), quotas.admit("t", limits)
    with pytest.raises(LimitExceeded) as caught:
        quotas.admit("t", limits)
    assert caught.value.limit == "max_concurrent" and "max_concurrent" in str(caught.value)
    assert quotas.admit("other", limits) is not None                # another tenant is not affected
    first.release()
    first.release()                                                 # idempotent
    assert quotas.inflight("t") == 1
    quotas.admit("t", limits).release()
    second.release()
    assert quotas.inflight("t") == 0


def test_rps_and_tps_limits_and_gateway_defaults():
    quotas = Quotas(defaults=Limits(rps=3))
    admitted = 0
    with pytest.raises(LimitExceeded) as caught:
        for _ in range(10):
            quotas.admit("t", Limits()).release()                   # the default rps applies
            admitted += 1
    assert admitted == 3 and caught.value.limit == "rps" and 0 < caught.value.retry_after <= 1 / 3 + 1e-6
    assert dict(caught.value.trailing_metadata())["hmi-limit"] == "rps"
    permit = quotas.admit("u", Limits(tps=100))
    permit.charge(100)
    with pytest.raises(LimitExceeded) as caught:
        quotas.admit("u", Limits(tps=100)).charge(50)
    assert caught.value.limit == "tps" and "(tps)" in str(caught.value)
    assert quotas.inflight("u") == 1                                # the refused request let go of its slot
    permit.give_back(60)                                            # a generation that stopped early
    quotas.admit("u", Limits(tps=100)).charge(50)
    assert Limits(priority=3).over(Limits(rps=5)) == Limits(rps=5, priority=3)
