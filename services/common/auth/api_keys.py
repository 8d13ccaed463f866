"""API keys: their format, their salted hashes, and the tenant patterns that scope them.

A key reads `hmi_<id>_<secret>`: the id is public (it names the key in listings and logs), the secret is 32
random bytes. The store keeps only `hashlib.scrypt(secret, salt)`; a gateway that sees a key fetches its
verifier by id and checks the secret itself. scrypt is slow on purpose (tens of milliseconds), so a gateway
remembers the keys it verified (services/gateway/key_ring.py) instead of hashing on every call.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from services.common.errors import InvalidArgument, quoted

KEY_PREFIX = "hmi_"
_KEY = re.compile(r"^hmi_(k[0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")
_ID = re.compile(r"^k[0-9a-f]{12}$")
TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1        # 16 MiB and ~50 ms per check on a small CPU
MAX_PATTERNS = 256


@dataclass(frozen=True)
class Verifier:
    """What the store keeps of a key's secret."""
    salt: bytes
    hash: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    def matches(self, secret: str) -> bool:
        candidate = hashlib.scrypt(secret.encode(), salt=self.salt, n=self.n, r=self.r, p=self.p,
                                   dklen=len(self.hash), maxmem=256 * self.n * self.r + (1 << 20))
        return hmac.compare_digest(candidate, self.hash)


def new_key() -> tuple[str, str, Verifier]:
    """(id, the whole key to hand out once, its verifier)."""
    key_id = "k" + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}", Verifier(salt, digest)


def split_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, None for anything else (e.g. the admin token)."""
    match = _KEY.match(token)
    return (match.group(1), match.group(2)) if match else None


def check_key_id(key_id: str) -> str:
    if not _ID.match(key_id or ""):
        raise InvalidArgument(f"{quoted(key_id)} is not a key id: ids are 'k' and 12 hex digits (hmi key list shows "
                              f"them)")
    return key_id


def check_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID.match(tenant_id or ""):
        raise InvalidArgument(f"tenant id {quoted(tenant_id)} is not valid: 1-128 letters, digits, '.', '_' or '-', "
                              f"starting with a letter or digit")
    return tenant_id


def check_patterns(patterns: list[str], kind: str = "tenants") -> list[str]:
    """Tenant ids or prefixes ending in '*' ('acme-*'; '*' alone: every tenant)."""
    cleaned = [p.strip() for p in patterns if p.strip()]
    if len(cleaned) > MAX_PATTERNS:
        raise InvalidArgument(f"a key names at most {MAX_PATTERNS} {kind}, got {len(cleaned)}")
    for pattern in cleaned:
        stem = pattern[:-1] if pattern.endswith("*") and kind == "tenants" else pattern
        valid = TENANT_ID.match(stem) is not None if stem else pattern == "*"
        if not valid:
            allowed = "ids, or prefixes ending in '*' such as 'acme-*'" if kind == "tenants" else "names"
            raise InvalidArgument(f"{kind}: {quoted(pattern)} is not valid; give {allowed} (letters, digits, '.', '_', "
                                  f"'-')")
    return cleaned


def covers(patterns: tuple[str, ...] | list[str], tenant_id: str) -> bool:
    """Whether a tenant id matches one of the patterns: an exact id or a prefix followed by '*'."""
    for pattern in patterns:
        if pattern.endswith("*"):
            if tenant_id.startswith(pattern[:-1]):
                return True
        elif pattern == tenant_id:
            return True
    return False
