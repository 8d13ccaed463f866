"""The API keys a gateway has seen, cached until the store's change log says they changed.

A key is checked once with scrypt against its verifier (fetched from the store by its public id) and then
remembered by an HMAC of the whole key under a random per-process key, so later calls cost a dictionary lookup,
not 50 ms of scrypt. A "key" entry of the change log (a revocation) drops the key and everything verified with
it, so a revoked key stops working at the gateway's next poll; expiry is checked on every call. Secrets are
never logged or kept in the clear."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

import grpc

from hmi_proto.v1 import knowledge_store_pb2 as pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as pb_grpc
from services.common.auth.api_keys import Verifier, split_key
from services.common.errors import Unauthenticated
from services.common.rpc import peer_errors, peer_unreachable

MAX_VERIFIED = 100_000
MAX_KEYS_CACHED = 100_000
NOT_A_CREDENTIAL = ("the credential is neither this deployment's admin token nor an API key (keys read hmi_<id>_..., "
                    "from `hmi key create`)")


@dataclass
class _Entry:
    key: pb.ApiKey
    verifier: Verifier
    fetched_at: float


class KeyRing:
    def __init__(self, store: pb_grpc.KnowledgeStoreStub, fresh: Callable[[float, float], bool],
                 timeout: float = 5.0, concurrent_checks: int = 2, stale_if_unreachable: float = 600.0) -> None:
        self.store = store
        self.stale_if_unreachable = stale_if_unreachable   # as the directory: a store that is down revokes nothing
        self.fresh = fresh                  # (fetched_at, now) -> still valid (the directory's rule)
        self.timeout = timeout
        self._entries: dict[str, _Entry] = {}
        self._verified: dict[bytes, str] = {}      # HMAC(process key, whole key) -> key id
        self._process_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._generation = 0
        self._checks = threading.BoundedSemaphore(concurrent_checks)   # scrypt: bounded CPU and memory

    def identify(self, token: str) -> pb.ApiKey:
        """The key's public record; Unauthenticated (saying why) for anything that is not a valid, live key."""
        parts = split_key(token)
        if parts is None:
            raise Unauthenticated(NOT_A_CREDENTIAL)
        key_id, secret = parts
        entry, generation = self._entry(key_id)
        self._check_live(entry.key)
        fingerprint = hmac.new(self._process_key, token.encode(), hashlib.sha256).digest()
        with self._lock:
            known = self._verified.get(fingerprint) == key_id
        if not known:
            with self._checks:
                matches = entry.verifier.matches(secret)
            if not matches:
                raise Unauthenticated(f"API key {key_id}: the secret does not match (a mistyped or truncated key?)")
            with self._lock:
                if self._generation == generation:
                    if len(self._verified) >= MAX_VERIFIED:
                        self._verified.clear()
                    self._verified[fingerprint] = key_id
        return entry.key

    @staticmethod
    def _check_live(key: pb.ApiKey) -> None:
        if key.revoked_at:
            raise Unauthenticated(f"API key {key.id} was revoked at {_when(key.revoked_at)}")
        if key.expires_at and time.time() >= key.expires_at:
            raise Unauthenticated(f"API key {key.id} expired at {_when(key.expires_at)}; ask for a new one")

    def _entry(self, key_id: str) -> tuple[_Entry, int]:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key_id)
            generation = self._generation
            if entry is not None and self.fresh(entry.fetched_at, now):
                return entry, generation
        try:
            found = self.store.GetKeyVerifier(pb.GetKeyVerifierRequest(id=key_id), timeout=self.timeout)
        except grpc.RpcError as error:
            if hasattr(error, "code") and error.code() == grpc.StatusCode.NOT_FOUND:
                raise Unauthenticated(f"API key {key_id} does not exist in this deployment") from None
            if entry is not None and peer_unreachable(error) and now - entry.fetched_at < self.stale_if_unreachable:
                return entry, generation
            with peer_errors():
                raise
        entry = _Entry(found.key, Verifier(found.salt, found.hash, found.n, found.r, found.p), now)
        with self._lock:
            if self._generation == generation:
                if len(self._entries) >= MAX_KEYS_CACHED:
                    self._entries.clear()
                self._entries[key_id] = entry
        return entry, generation

    def forget(self, key_id: str) -> None:
        """The key changed (revoked): drop it and every check made against it."""
        with self._lock:
            self._generation += 1
            self._entries.pop(key_id, None)
            for fingerprint in [f for f, known in self._verified.items() if known == key_id]:
                del self._verified[fingerprint]

    def forget_all(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()
            self._verified.clear()


def _when(unix_seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_seconds))
