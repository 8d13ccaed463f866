"""Quotas: tenants' limits split across gateways by demand, and API keys' own limits (no services needed)."""
from __future__ import annotations

import time

import pytest

from services.common.errors import LimitExceeded
from services.gateway.quotas import Limits, Quotas
from services.knowledge_store.limit_shares import LimitShares


def test_shares_follow_each_gateways_part_of_the_demand():
    shares = LimitShares(ttl=5.0)
    assert shares.report("a", {"t": 30.0}, now=0.0) == (1, {"t": 1.0})
    gateways, b = shares.report("b", {"t": 10.0, "new": 0.0}, now=0.5)
    assert gateways == 2 and b == {"t": pytest.approx(0.25), "new": 0.5}    # no demand anywhere yet: 1/N
    assert shares.report("a", {"t": 30.0}, now=1.0)[1] == {"t": pytest.approx(0.75)}
    assert shares.report("b", {}, now=1.5) == (2, {})       # reports with nothing still count b as live
    assert shares.report("a", {"t": 30.0}, now=2.0)[1] == {"t": 1.0}        # b's demand went away
    assert shares.report("a", {"t": 30.0}, now=7.0) == (1, {"t": 1.0})     # b silent past the TTL: gone


def test_a_gateway_applies_its_share_of_each_limit():
    quotas = Quotas()
    quotas.sharing = True
    quotas.set_shares(2, {"t": 0.25})
    limits = Limits(rps=8.0, max_concurrent=8)
    permits = [quotas.admit("t", limits) for _ in range(2)]       # 8 x 0.25 = 2 requests in flight here
    with pytest.raises(LimitExceeded, match=r"its limit \(max_concurrent\) is 8, 2 of it here") as refused:
        quotas.admit("t", limits)
    assert refused.value.limit == "max_concurrent"
    for permit in permits:
        permit.release()
    with pytest.raises(LimitExceeded, match="rps") as refused:    # a 2 requests/s bucket holds 2: spent
        quotas.admit("t", limits)
    assert refused.value.limit == "rps"
    assert quotas.take_demand() == {"t": 4} and quotas.take_demand() == {}     # refused calls are demand too
    assert quotas.share("other") == 0.5             # a tenant the store has not seen here: 1/N
    quotas.set_shares(1, {"t": 1.0})
    time.sleep(0.55)                                # refilled at its old 2/s: room for one
    quotas.admit("t", limits)                       # alone again: the whole limit (the bucket refills at 8/s)


def test_without_sharing_every_gateway_applies_the_whole_limits():
    quotas = Quotas()
    quotas.set_shares(4, {"t": 0.1})        # ignored: sharing is off
    limits = Limits(max_concurrent=2)
    quotas.admit("t", limits)
    quotas.admit("t", limits)
    with pytest.raises(LimitExceeded):
        quotas.admit("t", limits)
    assert quotas.take_demand() == {}


def test_a_keys_own_limits_hold_over_all_its_tenants_and_beside_theirs():
    quotas = Quotas()
    key = Limits(max_concurrent=2, rps=100.0)
    first = quotas.admit("a", Limits(), "k1", key)
    quotas.admit("b", Limits(), "k1", key)              # another tenant of the same key
    with pytest.raises(LimitExceeded, match=r"API key k1 has 2 requests in flight") as refused:
        quotas.admit("c", Limits(), "k1", key)
    assert refused.value.limit == "max_concurrent"
    quotas.admit("c", Limits(), "k2", key)              # another key: counted apart
    with pytest.raises(LimitExceeded, match="tenant 'a' has 1 requests in flight"):
        quotas.admit("a", Limits(max_concurrent=1), "k3", Limits(rps=100.0))      # the tenant's own limit
    assert quotas.inflight("a") == 1 and quotas.inflight("key:k3") == 0, "a refusal holds nothing"
    first.release()
    quotas.admit("c", Limits(), "k1", key)
    tokens = Quotas()
    permit = tokens.admit("a", Limits(tps=100.0), "k1", Limits(tps=50.0))
    permit.charge(30)
    with pytest.raises(LimitExceeded, match="API key k1 is over its limit of 50 tokens/s") as refused:
        permit.charge(30)                                # over the key's bucket (20 left), within the tenant's
    assert refused.value.limit == "tps"
    other = tokens.admit("a", Limits(tps=100.0))         # the tenant's bucket got the refused 30 back
    other.charge(69)                                     # 70 left: without the 30 back it would be 40
