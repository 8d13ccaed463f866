"""Reports this gateway's demand per tenant to the store each interval and applies the shares of the
tenants' limits the store answers (services/knowledge_store/limit_shares.py has the rule). A store that does
not answer leaves the last shares in force: a tenant keeps its limits as they were split, never N times
them, while the store is away."""
from __future__ import annotations

import logging
import threading
import time

from hmi_proto.v1 import knowledge_store_pb2 as pb
from services.common.errors import HMIError
from services.common.rpc import peer_errors
from services.common.tracing import outgoing_metadata
from services.gateway.quotas import Quotas

log = logging.getLogger("hmi.gateway.limit_sharing")


class LimitSharing:
    def __init__(self, quotas: Quotas, store, gateway_id: str, interval: float = 1.0) -> None:
        """`store`: the store's stub (KnowledgeStoreStub)."""
        self.quotas = quotas
        self.store = store
        self.gateway_id = gateway_id
        self.interval = interval
        self.gateways = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="limit-sharing", daemon=True)
        self._failing = False
        self._since: float | None = None        # when the demand being counted began
        quotas.sharing = True

    def start(self) -> None:
        self.report()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def report(self) -> None:
        """One round: this interval's demand out, the shares in."""
        began, now = self._since, time.monotonic()
        self._since = now
        seconds = max(1e-3, now - began) if began is not None else self.interval
        demand = {tenant: count / seconds for tenant, count in self.quotas.take_demand().items()}
        request = pb.ShareLimitsRequest(gateway_id=self.gateway_id, demand=[
            pb.TenantDemand(tenant_id=tenant, requests_per_second=rate) for tenant, rate in demand.items()])
        try:
            with peer_errors():
                reply = self.store.ShareLimits(request, timeout=max(0.5, self.interval), metadata=outgoing_metadata())
        except HMIError as error:
            if not self._failing:
                log.warning("cannot share tenants' limits with the other gateways now (%s); the last shares "
                            "stay in force", error)
            self._failing = True
            return
        if self._failing or reply.gateways != self.gateways:
            log.info("tenants' limits are shared by %d gateway%s", reply.gateways, "" if reply.gateways == 1 else "s")
        self._failing = False
        self.gateways = reply.gateways
        self.quotas.set_shares(reply.gateways, {entry.tenant_id: entry.share for entry in reply.shares})
