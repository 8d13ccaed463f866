"""Shares of tenants' limits across gateways, so that a tenant's requests/s, tokens/s and requests in flight
hold for the whole deployment, not once per gateway.

Every gateway reports, about once a second, the requests each tenant with limits asked of it (refused ones
included: they are demand too). A gateway's share of a tenant's limits is its part of that tenant's demand
over the gateways that reported lately: a tenant all of whose traffic reaches one gateway (a client holding
one HTTP/2 connection) gets its whole limit there, and one spread evenly gets 1/N at each of N. A gateway
with no report of a tenant yet (its first requests) takes 1/N. Soft state in memory: after a store restart
the next round of reports (a second) rebuilds it, and meanwhile gateways keep the shares they had."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

REPORT_TTL_S = 5.0              # a gateway silent this long is gone: its demand no longer counts
MAX_REPORTED_TENANTS = 100_000  # tenants one report may name


@dataclass
class _Report:
    at: float
    demand: dict[str, float]


class LimitShares:
    def __init__(self, ttl: float = REPORT_TTL_S) -> None:
        self.ttl = ttl
        self._reports: dict[str, _Report] = {}
        self._totals: dict[str, float] = {}     # tenant -> demand summed over the live reports
        self._lock = threading.Lock()

    def report(self, gateway_id: str, demand: dict[str, float], now: float | None = None
               ) -> tuple[int, dict[str, float]]:
        """Records one gateway's demand; returns the live gateways and this gateway's share per tenant named."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._replace(gateway_id, _Report(now, demand))
            for gone in [g for g, r in self._reports.items() if now - r.at > self.ttl]:
                self._replace(gone, None)
            live = len(self._reports)
            shares = {}
            for tenant, mine in demand.items():
                total = self._totals.get(tenant, 0.0)
                shares[tenant] = mine / total if total > 0 and mine > 0 else 1.0 / live
            return live, shares

    def _replace(self, gateway_id: str, report: _Report | None) -> None:
        old = self._reports.pop(gateway_id, None)
        if old is not None:
            for tenant, value in old.demand.items():
                left = self._totals.get(tenant, 0.0) - value
                if left > 1e-9:
                    self._totals[tenant] = left
                else:
                    self._totals.pop(tenant, None)
        if report is not None:
            self._reports[gateway_id] = report
            for tenant, value in report.demand.items():
                self._totals[tenant] = self._totals.get(tenant, 0.0) + value
