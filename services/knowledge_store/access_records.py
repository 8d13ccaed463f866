"""API keys and tenant limits in the store's LMDB: typed records, each write one transaction that also appends
to the change log ("key" / "limits" entries), so gateways forget a revoked key or changed limits at their
next poll, exactly as they forget a replaced tenant.

A key's secret never reaches LMDB: only its salt and scrypt hash (services/common/auth/api_keys.py)."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import lmdb

from services.common.auth.api_keys import Verifier, check_key_id, check_patterns, check_tenant_id, new_key
from services.common.errors import InvalidArgument, NotFound
from services.knowledge_store.layout import StoreLayout

log = logging.getLogger("hmi.store.access")
MAX_KEYS = 100_000
MAX_DESCRIPTION_CHARS = 256
MAX_EXPIRY_SECONDS = 100 * 365 * 86400.0
MAX_RATE = 1e9
MAX_COUNT = 1_000_000
MAX_PRIORITY = 1000


@dataclass
class KeyRecord:
    id: str
    tenants: list[str]
    tenant_admin: bool
    salt: str                         # hex
    hash: str                         # hex scrypt digest of the secret
    n: int
    r: int
    p: int
    created_at: float
    domains: list[str] = field(default_factory=list)
    description: str = ""
    expires_at: float = 0.0           # 0: never
    revoked_at: float = 0.0           # 0: active
    rps: float = 0.0                  # the key's own limits, beside its tenants'; 0: none
    tps: float = 0.0
    max_concurrent: int = 0

    def verifier(self) -> Verifier:
        return Verifier(bytes.fromhex(self.salt), bytes.fromhex(self.hash), self.n, self.r, self.p)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class LimitsRecord:
    """A tenant's quotas (0 = none) and fair-scheduling weight (0 = 1)."""
    tenant_id: str
    rps: float = 0.0
    tps: float = 0.0
    max_concurrent: int = 0
    max_queued: int = 0
    priority: int = 0

    def validate(self) -> LimitsRecord:
        for name in ("rps", "tps"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 <= value <= MAX_RATE:
                raise InvalidArgument(f"{name} {value} is outside [0, {MAX_RATE:g}] (0 = no limit)")
        for name in ("max_concurrent", "max_queued"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_COUNT:
                raise InvalidArgument(f"{name} {value} is outside [0, {MAX_COUNT}] (0 = no limit)")
        if not 0 <= self.priority <= MAX_PRIORITY:
            raise InvalidArgument(f"priority {self.priority} is outside [0, {MAX_PRIORITY}] (0 = 1, the default "
                                  f"share)")
        return self

    @property
    def empty(self) -> bool:
        return not (self.rps or self.tps or self.max_concurrent or self.max_queued or self.priority)


class AccessRecords:
    """Keys and limits over the store's layout (the `keys` and `limits` databases)."""

    def __init__(self, layout: StoreLayout) -> None:
        self.layout = layout

    # ---- keys -----------------------------------------------------------------------------------

    def create_key(self, tenants: list[str], *, tenant_admin: bool = False, domains: list[str] | None = None,
                   expires_in: float = 0.0, description: str = "", rps: float = 0.0, tps: float = 0.0,
                   max_concurrent: int = 0) -> tuple[KeyRecord, str]:
        """A new key; returns its record and the key itself (the only time it exists outside the caller)."""
        tenants = check_patterns(list(tenants))
        if not tenants:
            raise InvalidArgument("a key needs at least one tenant id or prefix (--tenants acme,acme-*); the admin "
                                  "token is the credential for everything")
        domains = check_patterns(list(domains or []), kind="domains")
        if not math.isfinite(expires_in) or not 0 <= expires_in <= MAX_EXPIRY_SECONDS:
            raise InvalidArgument(f"expiry of {expires_in} s is outside [0, 100 years] (0 = never)")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidArgument(f"the description is longer than {MAX_DESCRIPTION_CHARS} characters")
        LimitsRecord("key", rps=rps, tps=tps, max_concurrent=max_concurrent).validate()
        key_id, secret, verifier = new_key()
        now = time.time()
        record = KeyRecord(id=key_id, tenants=tenants, tenant_admin=tenant_admin, salt=verifier.salt.hex(),
                           hash=verifier.hash.hex(), n=verifier.n, r=verifier.r, p=verifier.p, created_at=now,
                           domains=domains, description=description,
                           expires_at=now + expires_in if expires_in else 0.0, rps=rps, tps=tps,
                           max_concurrent=max_concurrent)

        def write(txn: lmdb.Transaction) -> None:
            if txn.stat(self.layout.db["keys"])["entries"] >= MAX_KEYS:
                raise InvalidArgument(f"the store holds {MAX_KEYS} keys already; delete revoked ones first")
            self.layout.put_json(txn, "keys", key_id, record.to_json())
            self.layout.record_change(txn, "key", key_id)

        self.layout.write(write)
        log.info("created key %s (tenants %s%s)", key_id, ",".join(tenants),
                 ", tenant admin" if tenant_admin else ", inference only")
        return record, secret

    def get_key(self, key_id: str) -> KeyRecord:
        check_key_id(key_id)
        with self.layout.read() as txn:
            data = self.layout.get_json(txn, "keys", key_id)
        if data is None:
            raise NotFound(f"key {key_id} does not exist")
        return KeyRecord.from_json(data)

    def list_keys(self) -> list[KeyRecord]:
        with self.layout.read() as txn:
            return [KeyRecord.from_json(data) for _, data in self.layout.iter_json(txn, "keys")]

    def revoke_key(self, key_id: str) -> KeyRecord:
        """Marks the key revoked (kept, so a gateway can say so); revoking twice answers the first revocation."""
        check_key_id(key_id)

        def write(txn: lmdb.Transaction) -> KeyRecord:
            data = self.layout.get_json(txn, "keys", key_id)
            if data is None:
                raise NotFound(f"key {key_id} does not exist")
            record = KeyRecord.from_json(data)
            if not record.revoked_at:
                record.revoked_at = time.time()
                self.layout.put_json(txn, "keys", key_id, record.to_json())
                self.layout.record_change(txn, "key", key_id)
            return record

        record = self.layout.write(write)
        log.info("revoked key %s", key_id)
        return record

    # ---- limits ---------------------------------------------------------------------------------

    def set_limits(self, limits: LimitsRecord) -> LimitsRecord:
        check_tenant_id(limits.tenant_id)
        limits.validate()

        def write(txn: lmdb.Transaction) -> None:
            if limits.empty:
                txn.delete(limits.tenant_id.encode(), db=self.layout.db["limits"])
            else:
                self.layout.put_json(txn, "limits", limits.tenant_id, dataclasses.asdict(limits))
            self.layout.record_change(txn, "limits", limits.tenant_id)

        self.layout.write(write)
        log.info("limits of tenant %s: rps %g, tps %g, max concurrent %d, max queued %d, priority %d",
                 limits.tenant_id, limits.rps, limits.tps, limits.max_concurrent, limits.max_queued, limits.priority)
        return limits

    def limits(self, tenant_id: str, txn: lmdb.Transaction | None = None) -> LimitsRecord:
        """The tenant's limits (all 0 when none were set)."""
        if txn is None:
            with self.layout.read() as own:
                return self.limits(tenant_id, own)
        data = self.layout.get_json(txn, "limits", tenant_id)
        return LimitsRecord(**data) if data is not None else LimitsRecord(tenant_id)

    def limits_of(self, tenant_ids: list[str]) -> dict[str, LimitsRecord]:
        """The limits of several tenants, read in one transaction."""
        with self.layout.read() as txn:
            return {tenant_id: self.limits(tenant_id, txn) for tenant_id in tenant_ids}
