"""Per-tenant quotas, checked before any work: requests/s and tokens/s (token buckets holding one second's
worth), requests in flight, and (in the batcher) sequences queued. A call over a limit answers
RESOURCE_EXHAUSTED naming the limit, with a retry hint (`retry-after-ms` trailing metadata; HTTP Retry-After).

Limits come with the tenant's record from the store (`hmi tenant limits`), fields left at 0 falling back to the
gateway's defaults (`--default-tenant-rps`, ...). Each gateway counts the traffic it serves and applies its
share of each limit (requests/s, tokens/s, requests in flight), which the store computes from every gateway's
demand (services/knowledge_store/limit_shares.py; the gateway's limit_sharing.py reports and applies it):
behind N gateways a tenant gets its limits once, not N times. `max_queued` bounds one gateway's queue and
is not shared. Plain Python, no gRPC."""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from services.common.errors import LimitExceeded
from services.gateway.access import REFUSED

MAX_TRACKED = 100_000           # tenants with counters kept; the least recently seen are forgotten beyond
KEY_SUBJECT = "key:"            # an API key's counters sit beside the tenants' (tenant ids have no ':')


@dataclass(frozen=True)
class Limits:
    rps: float = 0.0            # 0 = no limit
    tps: float = 0.0
    max_concurrent: int = 0
    max_queued: int = 0
    priority: int = 0           # fair-scheduling weight; 0 = 1

    @classmethod
    def from_pb(cls, message) -> Limits:
        return cls(rps=message.rps, tps=message.tps, max_concurrent=message.max_concurrent,
                   max_queued=message.max_queued, priority=message.priority)

    def over(self, defaults: Limits) -> Limits:
        """These limits, with the fields left at 0 taken from `defaults`."""
        return Limits(*(mine or default for mine, default in zip(
            (self.rps, self.tps, self.max_concurrent, self.max_queued, self.priority),
            (defaults.rps, defaults.tps, defaults.max_concurrent, defaults.max_queued, defaults.priority))))

    @property
    def weight(self) -> float:
        return float(self.priority or 1)


class TokenBucket:
    """`rate` per second, holding at most one second's worth (at least 1). A cost above the capacity passes
    when the bucket is full and leaves it in debt, so a large request is slowed, never refused forever."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.level = self.capacity
        self.updated = now

    def take(self, cost: float, now: float) -> float:
        """0 when `cost` was taken, else the seconds until it could be."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        needed = min(cost, self.capacity)
        if self.level >= needed:
            self.level -= cost
            return 0.0
        return (needed - self.level) / self.rate

    def set_rate(self, rate: float, now: float) -> None:
        """A new rate (this gateway's share changed), keeping what the bucket holds up to its new capacity."""
        if rate == self.rate:
            return
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.level = min(self.level, self.capacity)

    def give_back(self, cost: float) -> None:
        self.level = min(self.capacity, self.level + cost)


@dataclass
class _Tenant:
    limits: Limits
    rps: TokenBucket | None
    tps: TokenBucket | None
    inflight: int = 0
    mean_seconds: float = 0.05         # recent request duration (a retry hint for max_concurrent)


@dataclass
class Permit:
    """A request admitted by `Quotas.admit`: charge its tokens, then release it when it ends (idempotent)."""
    quotas: Quotas
    tenant_id: str
    subjects: list[str]                 # the tenant, and its caller's key when the key has limits
    started: float = field(default_factory=time.monotonic)
    tokens: float = 0.0
    released: bool = False

    def charge(self, tokens: float) -> None:
        """Takes `tokens` from the tenant's tokens/s bucket; LimitExceeded (and the permit released) if empty."""
        self.quotas._charge(self, tokens)

    def give_back(self, tokens: float) -> None:
        """Tokens charged but not used (a generation that stopped before max_new_tokens)."""
        self.quotas._give_back(self, tokens)

    def release(self) -> None:
        self.quotas._release(self)


class Quotas:
    def __init__(self, defaults: Limits = Limits()) -> None:
        self.defaults = defaults
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._lock = threading.Lock()
        self.sharing = False                    # limits shared with other gateways (LimitSharing runs)
        self._gateways = 1
        self._shares: dict[str, float] = {}     # tenant -> this gateway's share of its limits
        self._demand: dict[str, int] = {}       # tenant with limits -> requests asked since the last report

    def share(self, tenant_id: str) -> float:
        """This gateway's part of the tenant's limits: 1 alone, else what the store gave (1/N before that)."""
        if not self.sharing:
            return 1.0
        return self._shares.get(tenant_id, 1.0 / self._gateways)

    def take_demand(self) -> dict[str, int]:
        """Requests each tenant with limits asked since the last call (refused ones included)."""
        with self._lock:
            demand, self._demand = self._demand, {}
            return demand

    def set_shares(self, gateways: int, shares: dict[str, float]) -> None:
        with self._lock:
            self._gateways = max(1, gateways)
            self._shares = {tenant: min(1.0, max(1e-6, share)) for tenant, share in shares.items()}

    def effective(self, limits: Limits) -> Limits:
        return limits.over(self.defaults)

    def _state(self, tenant_id: str, limits: Limits, share: float, now: float) -> _Tenant:
        state = self._tenants.get(tenant_id)
        if state is None or state.limits != limits:      # new, or its limits changed: fresh buckets
            inflight = state.inflight if state is not None else 0
            state = _Tenant(limits, TokenBucket(limits.rps * share, now) if limits.rps else None,
                            TokenBucket(limits.tps * share, now) if limits.tps else None, inflight)
            self._tenants[tenant_id] = state
        else:
            if state.rps is not None:
                state.rps.set_rate(limits.rps * share, now)
            if state.tps is not None:
                state.tps.set_rate(limits.tps * share, now)
        self._tenants.move_to_end(tenant_id)
        while len(self._tenants) > MAX_TRACKED:
            oldest, old = next(iter(self._tenants.items()))
            if old.inflight:
                break
            del self._tenants[oldest]
        return state

    def admit(self, tenant_id: str, limits: Limits, key_id: str = "", key_limits: Limits | None = None) -> Permit:
        """Checks requests/s and requests in flight of the tenant and, when the caller's API key has limits of
        its own (`key_limits`), of the key too; LimitExceeded names the limit and when to retry."""
        subjects = [(tenant_id, f"tenant {tenant_id!r}", self.effective(limits))]
        if key_id and key_limits is not None and (key_limits.rps or key_limits.tps or key_limits.max_concurrent):
            subjects.append((KEY_SUBJECT + key_id, f"API key {key_id}", key_limits))
        now = time.monotonic()
        with self._lock:
            passed: list[_Tenant] = []
            try:
                for subject, who, subject_limits in subjects:
                    passed.append(self._check(subject, who, subject_limits, now))
            except LimitExceeded:
                for state in passed:            # its requests/s token, taken before another limit said no
                    if state.rps is not None:
                        state.rps.give_back(1.0)
                raise
            for state in passed:
                state.inflight += 1
        return Permit(self, tenant_id, [subject for subject, _, _ in subjects], started=now)

    def _check(self, subject: str, who: str, limits: Limits, now: float) -> _Tenant:
        share = self.share(subject)
        state = self._state(subject, limits, share, now)
        if self.sharing and (limits.rps or limits.tps or limits.max_concurrent):
            self._demand[subject] = self._demand.get(subject, 0) + 1
        here = _shared(share, self._gateways)
        concurrent = math.ceil(limits.max_concurrent * share) if limits.max_concurrent else 0
        if concurrent and state.inflight >= concurrent:
            REFUSED.labels("max_concurrent").inc()
            raise LimitExceeded(f"{who} has {state.inflight} requests in flight{here}, its limit (max_concurrent) "
                                f"is {limits.max_concurrent}{_part(concurrent, share)}; retry when one has finished",
                                "max_concurrent", state.mean_seconds)
        if state.rps is not None:
            wait = state.rps.take(1.0, now)
            if wait:
                REFUSED.labels("rps").inc()
                raise LimitExceeded(f"{who} is over its limit of {limits.rps:g} requests/s (rps)"
                                    f"{_part(state.rps.rate, share)}; retry in {wait:.2f}s", "rps", wait)
        return state

    def _charge(self, permit: Permit, tokens: float) -> None:
        now = time.monotonic()
        with self._lock:
            taken: list[TokenBucket] = []
            for subject in permit.subjects:
                state = self._tenants.get(subject)
                bucket = state.tps if state is not None else None
                wait = bucket.take(tokens, now) if bucket is not None else 0.0
                if wait:
                    for other in taken:
                        other.give_back(tokens)
                    break
                if bucket is not None:
                    taken.append(bucket)
            else:
                permit.tokens += tokens
                return
        permit.release()
        REFUSED.labels("tps").inc()
        who = f"API key {subject[len(KEY_SUBJECT):]}" if subject.startswith(KEY_SUBJECT) else f"tenant {subject!r}"
        share = bucket.rate / state.limits.tps if state.limits.tps else 1.0
        raise LimitExceeded(f"{who} is over its limit of {state.limits.tps:g} tokens/s (tps)"
                            f"{_part(bucket.rate, share)}: this request needs {tokens:g}; retry in {wait:.2f}s",
                            "tps", wait)

    def _give_back(self, permit: Permit, tokens: float) -> None:
        with self._lock:
            for subject in permit.subjects:
                state = self._tenants.get(subject)
                if state is not None and state.tps is not None and tokens > 0:
                    state.tps.give_back(min(tokens, permit.tokens))

    def _release(self, permit: Permit) -> None:
        with self._lock:
            if permit.released:
                return
            permit.released = True
            for subject in permit.subjects:
                state = self._tenants.get(subject)
                if state is not None:
                    state.inflight = max(0, state.inflight - 1)
                    state.mean_seconds = 0.8 * state.mean_seconds + 0.2 * (time.monotonic() - permit.started)

    def inflight(self, tenant_id: str) -> int:
        with self._lock:
            state = self._tenants.get(tenant_id)
            return state.inflight if state is not None else 0


def _shared(share: float, gateways: int) -> str:
    return f" at this gateway (one of {gateways})" if share < 1.0 else ""


def _part(value: float, share: float) -> str:
    """How much of a limit this gateway applies, when it shares it with others."""
    return f", {value:.3g} of it here ({share:.0%} of the tenant's demand reaches this gateway)" if share < 1.0 else ""
