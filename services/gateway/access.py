"""Who is calling the gateway, and what that caller may do: plain Python under the core, which asks it first in
every operation (for the gRPC and HTTP doors alike: both pass the caller's credential to the core).

- The admin credential (`--admin-token-file` / HMI_ADMIN_TOKEN; `hmi up` makes one) may do everything.
- An API key covers tenant ids and prefixes (`acme`, `acme-*`). A plain key is inference only: Classify, Embed,
  Generate, and reading its tenants' records and limits. A key made with --admin-of-tenants may also register,
  train (PLOT lookups), export and delete its tenants.
- Domains, keys, limits and backups are the admin's. A key sees only its tenants (ListTenants is filtered;
  another tenant answers PERMISSION_DENIED whether or not it exists, so nothing leaks about other tenants) and
  only its domains: those its registered tenants belong to and those the key names (`--domains`). Its tenants
  are registered, and PLOT is read (Lookup), only in its domains.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Iterable

from prometheus_client import Counter

from hmi_proto.v1 import knowledge_store_pb2 as pb
from services.common.auth.api_keys import covers
from services.common.errors import PermissionDenied, Unauthenticated, quoted
from services.gateway.key_ring import KeyRing

log = logging.getLogger("hmi.gateway.access")
REFUSED = Counter("hmi_gateway_refused_total", "calls refused before any work, by reason", ["reason"])
MISSING = ("no credential: send the metadata `authorization: Bearer <key>` (HTTP: the Authorization header) with "
           "an API key (`hmi key create`) or the admin token")


@dataclass(frozen=True)
class Principal:
    """The caller: the admin, or an API key and its scope."""
    name: str                               # "the admin" or "API key k..." (messages and logs; never a secret)
    admin: bool = False
    tenants: tuple[str, ...] = ()
    tenant_admin: bool = False
    domains: tuple[str, ...] = ()
    key_id: str = ""
    key_limits: tuple[float, float, int] = (0.0, 0.0, 0)    # the key's own rps, tps, max_concurrent (0 = none)

    @classmethod
    def of_key(cls, key: pb.ApiKey) -> Principal:
        return cls(f"API key {key.id}", tenants=tuple(key.tenants), tenant_admin=key.tenant_admin,
                   domains=tuple(key.domains), key_id=key.id, key_limits=(key.rps, key.tps, key.max_concurrent))

    def covers(self, tenant_id: str) -> bool:
        return self.admin or covers(self.tenants, tenant_id)

    def _scope(self) -> str:
        rights = "tenant admin" if self.tenant_admin else "inference only"
        return f"{self.name} covers tenants {', '.join(self.tenants)} ({rights})"

    def require_admin(self, what: str) -> None:
        if not self.admin:
            REFUSED.labels("permission_denied").inc()
            raise PermissionDenied(f"{what} needs the admin credential; {self._scope()}")

    def require_tenant(self, tenant_id: str, what: str, *, manage: bool = False) -> None:
        """`manage`: register, train, export or delete (a tenant-admin key); else inference and reading."""
        if self.admin:
            return
        if not covers(self.tenants, tenant_id):
            REFUSED.labels("permission_denied").inc()
            raise PermissionDenied(f"{what} of tenant {quoted(tenant_id)} is outside this credential's scope: "
                                   f"{self._scope()}")
        if manage and not self.tenant_admin:
            REFUSED.labels("permission_denied").inc()
            raise PermissionDenied(f"{what} of tenant {quoted(tenant_id)} needs a key made with --admin-of-tenants; "
                                   f"{self.name} is inference only")

    def require_tenant_admin(self, what: str) -> None:
        if not self.admin and not self.tenant_admin:
            REFUSED.labels("permission_denied").inc()
            raise PermissionDenied(f"{what} needs a key made with --admin-of-tenants (or the admin credential); "
                                   f"{self.name} is inference only")


ADMIN = Principal("the admin", admin=True)


class Access:
    """Turns a call's metadata into a Principal. `enabled` False (`--auth off`): everyone is the admin."""

    def __init__(self, *, enabled: bool, admin_token: str | None, keys: KeyRing | None) -> None:
        if enabled and not admin_token:
            raise ValueError("authentication needs an admin token")
        self.enabled = enabled
        self._admin_digest = hashlib.sha256(admin_token.encode()).digest() if admin_token else b""
        self.keys = keys

    def principal(self, metadata: Iterable[tuple[str, str]] | None) -> Principal:
        return self.principal_of(bearer_token(metadata))

    def principal_of(self, token: str | None) -> Principal:
        """The caller holding `token` (None: no credential sent)."""
        if not self.enabled:
            return ADMIN
        if not token:
            REFUSED.labels("unauthenticated").inc()
            raise Unauthenticated(MISSING)
        if hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_digest):
            return ADMIN
        try:
            if self.keys is None:
                raise Unauthenticated("this gateway accepts only the admin token")
            return Principal.of_key(self.keys.identify(token))
        except Unauthenticated:
            REFUSED.labels("unauthenticated").inc()
            raise


def bearer_token(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    """The credential of `authorization: Bearer <credential>` metadata, None when there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = (value if isinstance(value, str) else value.decode("latin-1")).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("the authorization metadata must read `Bearer <credential>`")
    return None
