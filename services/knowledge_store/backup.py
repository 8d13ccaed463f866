"""Backup and restore of the store's LMDB environment, without the service's heavy dependencies (the CLI
runs these directly on a data dir; the running store's Backup RPC uses the same copy).

A backup is a folder holding one compacted `data.mdb`: LMDB's copy of a single read snapshot, so it holds
every write committed before the copy began and nothing half-written, while writers go on. Restoring puts
it in place as `DATA_DIR/store.lmdb` and gives the store a new id, so every gateway following the old
store's change log starts over instead of trusting records cached from a future the backup never saw. Its
revision counter jumps by RESTORE_REVISION_JUMP, so adapter versions written after the restore never repeat
one written after the backup but before the restore (which a compute replica may still cache).
"""
from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import lmdb

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.knowledge_store.layout import DATABASES, SCHEMA_VERSION

STORE_FOLDER = "store.lmdb"
RESTORE_REVISION_JUMP = 1 << 32


@dataclass
class BackupReport:
    path: str
    bytes: int
    revision: int
    seconds: float


def _empty_target(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FailedPrecondition(f"{str(path)!r} exists and is not empty; give a new folder")
    path.mkdir(parents=True, exist_ok=True)


COPY_ATTEMPTS = 5   # copies a hot backup may restart when the running store grows its map meanwhile


def _revision(env: lmdb.Environment) -> int:
    meta = env.open_db(b"meta", create=False)
    with env.begin() as txn:
        schema = txn.get(b"schema", db=meta)
        if schema is None or int(schema) != SCHEMA_VERSION:
            raise InvalidArgument(f"not an HMI store of schema {SCHEMA_VERSION} (schema {schema!r})")
        raw = txn.get(b"revision", db=meta)
    return int(raw) if raw else 0


def backup_data_dir(data_dir: Path, target: Path) -> BackupReport:
    """A hot copy of the store in `data_dir` (running or not) into the new folder `target`."""
    source = Path(data_dir) / STORE_FOLDER
    if not (source / "data.mdb").is_file():
        raise NotFound(f"no store at {str(source)!r} (expected {STORE_FOLDER}/data.mdb in the data dir)")
    target = Path(target)
    _empty_target(target)
    started = time.monotonic()
    env = lmdb.open(str(source), readonly=True, lock=True, max_dbs=len(DATABASES) + 2, subdir=True)
    try:
        for attempt in range(COPY_ATTEMPTS):
            try:
                revision = _revision(env)
                env.copy(str(target), compact=True)
                break
            except lmdb.MapResizedError:
                # The running store grew its map while this process read it: adopt the new size, start again.
                if attempt == COPY_ATTEMPTS - 1:
                    raise FailedPrecondition(f"the store kept growing its map during {COPY_ATTEMPTS} copies; retry "
                                             f"the backup (or back up through the store: without --data-dir)") from None
                (target / "data.mdb").unlink(missing_ok=True)
                env.set_mapsize(0)
    finally:
        env.close()
    return BackupReport(str(target.resolve()), (target / "data.mdb").stat().st_size, revision,
                        time.monotonic() - started)


def restore(backup: Path, data_dir: Path, *, force: bool = False) -> BackupReport:
    """Makes `data_dir` a store holding the backup (the store must be stopped). An existing store there is
    refused, or with `force` moved aside to `store.lmdb.replaced-TIME`."""
    backup = Path(backup)
    if not (backup / "data.mdb").is_file():
        raise NotFound(f"{str(backup)!r} holds no data.mdb: not a backup made by `hmi store backup`")
    started = time.monotonic()
    target = Path(data_dir) / STORE_FOLDER
    if target.exists() and any(target.iterdir()):
        if not force:
            raise FailedPrecondition(f"{str(target)!r} already holds a store; stop the store and pass --force to "
                                     f"move it aside, or restore into another data dir")
        target.rename(target.with_name(f"{STORE_FOLDER}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
    staging = target.with_name(f".{STORE_FOLDER}.restoring-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(backup / "data.mdb", staging / "data.mdb")
        # Room beyond the compacted file for the few pages the identity change copies on write.
        room = (staging / "data.mdb").stat().st_size + (64 << 20)
        env = lmdb.open(str(staging), map_size=room, max_dbs=len(DATABASES) + 2, subdir=True)
        try:
            revision = _revision(env)
            meta = env.open_db(b"meta", create=False)
            with env.begin(write=True) as txn:     # a new identity: followers of the old store start over
                txn.put(b"store_id", uuid.uuid4().hex.encode(), db=meta)
                txn.put(b"revision", str(revision + RESTORE_REVISION_JUMP).encode(), db=meta)
        finally:
            env.close()
        if target.exists():
            target.rmdir()
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BackupReport(str(target.resolve()), (target / "data.mdb").stat().st_size, revision,
                        time.monotonic() - started)
