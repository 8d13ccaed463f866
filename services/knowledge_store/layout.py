"""LMDB layout of the knowledge store: one environment, named databases, fixed key encodings.

    meta      b"schema" -> version; b"next_domain_id" -> u32; b"store_id" -> random hex (new store = new id);
              b"revision" -> last change-log revision
    domains   name -> JSON domain record
    nodes     domain_id u32 BE + context path (token, token before it, ...) u32 BE each
              -> (block u32, row u32, count u64) little-endian
    blocks    domain_id u32 BE + block u32 BE -> ROWS_PER_BLOCK fp16 rows (last block may be short)
    free_rows domain_id u32 BE + row u32 BE -> b"" (rows freed by pruning, reused first)
    traffic   node key of a context missing from the tree -> count u64 + sample sequences (see
              tree_learning.py): what live lookups asked for, until materialised
    offsets   domain_id u32 BE -> (k, P, H) u32 LE + float32 [k, P, H] position offsets (position_offsets.py)
    lower     domain name -> safetensors of the domain-adapted lower layers
    tenants   tenant id -> JSON tenant record
    adapters  tenant id -> safetensors bytes
    changes   revision u64 BE -> JSON [kind, name] ("tenant", "domain", "key", "limits"): what gateways must
              forget, written in the same transaction as the change; the last CHANGES_KEPT entries are kept
    requests  client request id -> JSON {kind, target, revision, result}: writes already applied, so a retry
              after a lost answer returns the first result (idempotency.py); the last REQUESTS_KEPT are kept
    request_log  revision u64 BE -> request id (oldest first, for pruning `requests`)
    keys      key id -> JSON key record: tenant patterns, rights, expiry, salt and scrypt hash of its secret
              (never the secret; access_records.py)
    limits    tenant id -> JSON limits (rps, tps, max concurrent, max queued, priority)
    files     file id -> JSON training-file record (fine_tuning.py); file_data: file id -> its JSONL bytes
    jobs      job id -> JSON fine-tuning job record (state, lease, checkpoints' metadata)
    job_events   job id + b"/" + sequence u64 BE -> JSON event
    checkpoints  job id -> the job's latest checkpoint (safetensors: parameters and optimizer moments)

Every transaction goes through `read()` / `write()`: they hold a shared lock that growing the map takes
exclusively (LMDB remaps only while no transaction is open). A write that finds the map full grows it
(doubling, up to `max_map_size`) and runs again; at the ceiling it fails with RESOURCE_EXHAUSTED.

PLOT vectors live in blocks of many rows, not one value per vector: LMDB gives each small value its
own 4 KiB page (100k vectors stored one by one took 392 MiB; docs/architecture.md).
"""
from __future__ import annotations

import json
import logging
import struct
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import lmdb

from services.common.errors import ResourceExhausted
from services.knowledge_store.shared_lock import SharedLock

log = logging.getLogger("hmi.store.layout")
T = TypeVar("T")

SCHEMA_VERSION = 1
ROWS_PER_BLOCK = 64
NODE_VALUE = struct.Struct("<IIQ")
_U32 = struct.Struct(">I")
_BLOCK_KEY = struct.Struct(">II")
DATABASES = ("meta", "domains", "nodes", "blocks", "free_rows", "traffic", "offsets", "lower", "tenants",
             "adapters", "changes", "requests", "request_log", "keys", "limits", "bridges", "files", "file_data",
             "jobs", "job_events", "checkpoints")
CHANGES_KEPT = 100_000      # change-log entries kept; a reader further behind starts over
_REVISION = struct.Struct(">Q")
OFFSETS_HEADER = struct.Struct("<III")


MAX_KEY_BYTES = 511         # LMDB's default key size limit
GROW_AT = 0.8               # grow the map before a write once this share of it is in use


def gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"


def keep_private(path: Path, files: tuple[str, ...] = ("data.mdb", "lock.mdb")) -> None:
    """A folder 0700 and its files named 0600, also for a store created before this rule: the LMDB files hold
    every tenant's adapter and the API-key verifiers."""
    for target, mode in [(path, 0o700)] + [(path / name, 0o600) for name in files]:
        try:
            if target.exists() and target.stat().st_mode & 0o777 != mode:
                target.chmod(mode)
                log.info("made %s private (mode %o)", target, mode)
        except OSError as error:   # not ours to change (a mounted volume): say so, serve anyway
            log.warning("cannot make %s private: %s", target, error)


class StoreLayout:
    """Owns the LMDB environment and its named databases."""

    def __init__(self, path: Path, map_size: int, max_map_size: int | None = None) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DATABASES) + 2, subdir=True,
                             readahead=False, max_readers=512, lock=True)
        keep_private(path)
        self.map_size = self.env.info()["map_size"]     # LMDB keeps an existing file's larger size
        self.max_map_size = max(max_map_size or map_size, self.map_size)
        self._lock = SharedLock()
        self._grow_lock = threading.Lock()
        self._committed = threading.local()             # revision a write recorded, until it commits
        self.on_commit: list[Callable[[int], None]] = []  # called with the revision after each logged change
        self.db = {name: self.env.open_db(name.encode()) for name in DATABASES}
        with self.env.begin(write=True) as txn:
            stored = txn.get(b"schema", db=self.db["meta"])
            if stored is None:
                txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=self.db["meta"])
            elif int(stored) != SCHEMA_VERSION:
                raise RuntimeError(f"store at {path} has schema {int(stored)}, this build reads {SCHEMA_VERSION}")
            if txn.get(b"store_id", db=self.db["meta"]) is None:
                txn.put(b"store_id", uuid.uuid4().hex.encode(), db=self.db["meta"])
            self.store_id = bytes(txn.get(b"store_id", db=self.db["meta"])).decode()

    def close(self) -> None:
        with self._lock.exclusive():
            self.env.close()

    # ---- transactions ---------------------------------------------------------------------

    @contextmanager
    def read(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read-only snapshot (MVCC: writers never wait for it)."""
        with self._lock.shared(), self.env.begin(buffers=buffers) as txn:
            yield txn

    def write(self, work: Callable[[lmdb.Transaction], T]) -> T:
        """Runs `work` in one write transaction; a full map is grown (up to the ceiling) and `work` runs again,
        so it must not have effects outside the transaction before it returns."""
        while True:
            self._grow_if_nearly_full()
            self._committed.revision = 0
            try:
                with self._lock.shared(), self.env.begin(write=True) as txn:
                    result = work(txn)
            except lmdb.MapFullError:
                if not self._grow(self.map_size * 2):
                    raise ResourceExhausted(
                        f"the knowledge store is full: its LMDB map reached {gib(self.map_size)}, the ceiling set by "
                        f"--max-map-size-gib (HMI_STORE_MAX_MAP_SIZE_GIB); raise it and restart the store, or delete "
                        f"domains or tenants. Nothing of this call was written.") from None
                continue
            revision, self._committed.revision = self._committed.revision, 0
            if revision:
                for callback in self.on_commit:
                    callback(revision)
            return result

    def used_bytes(self) -> int:
        info = self.env.info()
        return (info["last_pgno"] + 1) * self.env.stat()["psize"]

    def _grow_if_nearly_full(self) -> None:
        if self.map_size < self.max_map_size and self.used_bytes() > GROW_AT * self.map_size:
            self._grow(max(self.map_size * 2, int(self.used_bytes() / GROW_AT) + 1))

    def _grow(self, wanted: int) -> bool:
        """Raises the map size towards `wanted` (at most the ceiling); False when already at the ceiling."""
        if self._lock.held_shared():
            return False              # a write nested in a read cannot remap; it fails as full
        with self._grow_lock:
            target = min(self.max_map_size, max(wanted, self.map_size))
            if target <= self.map_size:
                return self.map_size < self.max_map_size   # another thread grew it meanwhile
            with self._lock.exclusive():
                self.env.set_mapsize(target)
            log.info("LMDB map grown from %s to %s (ceiling %s)", gib(self.map_size), gib(target),
                     gib(self.max_map_size))
            self.map_size = target
            return True

    def copy_to(self, folder: Path) -> None:
        """A consistent, compacted copy of the environment (one read snapshot) into `folder`/data.mdb."""
        with self._lock.shared():
            self.env.copy(str(folder), compact=True)

    def next_domain_id(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"next_domain_id", db=self.db["meta"])
        value = int(raw) if raw else 1
        txn.put(b"next_domain_id", str(value + 1).encode(), db=self.db["meta"])
        return value

    def record_change(self, txn: lmdb.Transaction, kind: str, name: str) -> int:
        """Appends to the change log in the writer's transaction, so readers never miss a committed change."""
        revision = self.revision(txn) + 1
        self._committed.revision = revision
        txn.put(b"revision", str(revision).encode(), db=self.db["meta"])
        txn.put(_REVISION.pack(revision), json.dumps([kind, name]).encode(), db=self.db["changes"])
        if revision > CHANGES_KEPT:
            txn.delete(_REVISION.pack(revision - CHANGES_KEPT), db=self.db["changes"])
        return revision

    def revision(self, txn: lmdb.Transaction) -> int:
        raw = txn.get(b"revision", db=self.db["meta"])
        return int(raw) if raw else 0

    def changes_after(self, txn: lmdb.Transaction, after: int, limit: int) -> tuple[list[tuple[int, str, str]], bool]:
        """Up to `limit` changes with a revision above `after`, and whether the log still reaches back that far."""
        latest = self.revision(txn)
        if after < latest - CHANGES_KEPT:
            return [], False
        if after >= latest:
            return [], True
        cursor = txn.cursor(db=self.db["changes"])
        changes: list[tuple[int, str, str]] = []
        if cursor.set_range(_REVISION.pack(after + 1)):
            for key, value in cursor:
                if len(changes) >= limit:
                    break
                kind, name = json.loads(bytes(value))
                changes.append((_REVISION.unpack(bytes(key))[0], kind, name))
        return changes, True

    def get_json(self, txn: lmdb.Transaction, db: str, key: str) -> dict[str, Any] | None:
        encoded = key.encode()
        if not 0 < len(encoded) <= MAX_KEY_BYTES:
            return None                 # no record can have such a key (names are checked when written)
        raw = txn.get(encoded, db=self.db[db])
        return json.loads(bytes(raw)) if raw is not None else None

    def put_json(self, txn: lmdb.Transaction, db: str, key: str, value: dict[str, Any]) -> None:
        txn.put(key.encode(), json.dumps(value, sort_keys=True).encode(), db=self.db[db])

    def put_json_bytes(self, txn: lmdb.Transaction, db: str, key: bytes, value: dict[str, Any]) -> None:
        txn.put(key, json.dumps(value, sort_keys=True).encode(), db=self.db[db])

    @staticmethod
    def decode_json(value) -> Any:
        return json.loads(bytes(value))

    def iter_json(self, txn: lmdb.Transaction, db: str, start: str = ""):
        cursor = txn.cursor(db=self.db[db])
        if not cursor.set_range(start.encode()):
            return
        for key, value in cursor:
            yield bytes(key).decode(), json.loads(bytes(value))

    def delete_prefix(self, txn: lmdb.Transaction, db: str, prefix: bytes) -> int:
        cursor = txn.cursor(db=self.db[db])
        removed = 0
        if cursor.set_range(prefix):
            while bytes(cursor.key()).startswith(prefix):
                removed += 1
                if not cursor.delete():
                    break
        return removed


def domain_prefix(domain_id: int) -> bytes:
    return _U32.pack(domain_id)


def node_key(domain_id: int, path: tuple[int, ...]) -> bytes:
    return struct.pack(f">I{len(path)}I", domain_id, *path)


def block_key(domain_id: int, block: int) -> bytes:
    return _BLOCK_KEY.pack(domain_id, block)


def free_row_key(domain_id: int, row: int) -> bytes:
    return _BLOCK_KEY.pack(domain_id, row)


def path_of(key: bytes) -> tuple[int, ...]:
    """The context path of a node key (the domain id stripped)."""
    return struct.unpack(f">{len(key) // 4 - 1}I", key[4:])
