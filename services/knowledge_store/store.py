"""Knowledge-store logic: domains and their PLOT, tenants and adapters, over one LMDB environment.

No gRPC here: the servicer, the tests and the studies call this directly. Every write is one LMDB
transaction, so a killed process loses nothing committed and readers never see half a write. Records
are typed (records.py); the store is one class made of parts, one module each: domains (domains.py), lookups
(lookups.py), tenants (tenants.py), training files and fine-tuning jobs (fine_tuning.py) over what they share
(store_base.py), with its settings in store_settings.py;
tree maintenance (tree_maintenance.py) works through their public methods.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from models.dims import ModelDims
from services.common.errors import FailedPrecondition, InvalidArgument, quoted
from services.knowledge_store.access_records import AccessRecords
from services.knowledge_store.change_followers import ChangeFollowers
from services.knowledge_store.domains import DomainsPart
from services.knowledge_store.fine_tuning import FineTuningPart
from services.knowledge_store.layout import StoreLayout, keep_private
from services.knowledge_store.lookups import LookupsPart
from services.knowledge_store.lower_models import LowerModels
from services.knowledge_store.store_settings import CHANGES_PER_REPLY, StoreSettings  # noqa: F401 - re-exported
from services.knowledge_store.tenants import TenantsPart
from services.knowledge_store.tree_learning import TrafficLog
from services.knowledge_store.tree_maintenance import TreeMaintenance

log = logging.getLogger("hmi.store")


@dataclass
class ChangeFeed:
    """Changes after a reader's revision; `complete` False: the reader must drop everything it cached."""
    store_id: str
    revision: int
    changes: list[tuple[int, str, str]]       # (revision, "tenant" | "domain", name)
    complete: bool



class KnowledgeStore(DomainsPart, LookupsPart, TenantsPart, FineTuningPart):
    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        if not 1 <= settings.default_rank <= settings.max_rank:
            raise InvalidArgument(f"the default rank {settings.default_rank} must lie in 1..{settings.max_rank} "
                                  f"(--max-rank)")
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keep_private(settings.data_dir, files=())     # the data dir: the store, credentials, logs
        self.layout = StoreLayout(settings.data_dir / "store.lmdb", settings.map_size, settings.max_map_size)
        self.followers = ChangeFollowers(max_wait=settings.follower_wait)
        self.access = AccessRecords(self.layout)        # API keys and tenant limits
        self.layout.on_commit.append(self.followers.committed)
        with self.layout.read() as txn:
            self.followers.committed(self.layout.revision(txn))
        # Several base models may share one store: every domain (and its tenants) belongs to one of them.
        self.model_dirs = {settings.model_name: settings.model_dir, **settings.extra_models}
        self.model_dims = {name: ModelDims.from_dir(path) for name, path in self.model_dirs.items()}
        self.dims = self.model_dims[settings.model_name]      # the default model's
        self.lower_models = LowerModels(self.layout, self.model_dirs, self.model_dims)
        self._build_lock = threading.Lock()
        self.traffic = TrafficLog(settings.max_pending_contexts, settings.max_sequence_tokens)
        self._stop = threading.Event()
        self.stopping = self._stop          # set by close(): long jobs (builds, adaptations) give up
        self._maintainer: threading.Thread | None = None
        self.maintenance = TreeMaintenance(self)

    def start_maintenance(self) -> None:
        """Background flushes of the traffic log: materialisation and pruning (the server starts this)."""
        if self._maintainer is None:
            self._maintainer = threading.Thread(target=self._maintain, name="tree-maintenance", daemon=True)
            self._maintainer.start()

    def learn_once(self) -> dict[str, int]:
        """Flushes the traffic log now: counts, materialisation, pruning; returns what changed."""
        return self.maintenance.learn_once()

    def _maintain(self) -> None:
        while not self._stop.wait(self.settings.learn_interval):
            try:
                self.learn_once()
            except Exception:  # noqa: BLE001 - keep maintaining; the next flush retries with fresh counts
                log.exception("tree maintenance failed")

    def close(self, timeout: float = 5.0) -> None:
        """Stops maintenance and long jobs (their progress reports raise Cancelled), then closes LMDB."""
        self._stop.set()
        self.followers.close()
        if self._maintainer is not None:
            self._maintainer.join(timeout=timeout)
        if self._build_lock.acquire(timeout=timeout):    # a cancelled build or adaptation has let go
            self._build_lock.release()
        self.layout.close()

    def changes_after(self, revision: int, limit: int = CHANGES_PER_REPLY) -> ChangeFeed:
        """Tenants and domains written after `revision`, for caches elsewhere (the gateway's directory)."""
        with self.layout.read() as txn:
            changes, complete = self.layout.changes_after(txn, revision, limit)
            latest = self.layout.revision(txn)
        if revision > latest:
            complete = False    # the reader knew a newer log: the store was replaced by an older copy
        return ChangeFeed(self.layout.store_id, latest, changes, complete)

    def backup(self, path: Path) -> dict[str, float]:
        """A consistent, compacted copy of the whole store (one LMDB read snapshot, so it holds every write
        acknowledged before it began) into the new or empty folder `path`, as `path`/data.mdb."""
        path = Path(path)
        try:
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                raise FailedPrecondition(f"backup folder {quoted(str(path))} exists and is not empty; give a new "
                                         f"folder")
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:   # a name too long, no permission, a file in the way...
            raise InvalidArgument(f"cannot create backup folder {quoted(str(path))} on the store's machine: "
                                  f"{error.strerror or error}") from None
        started = time.monotonic()
        with self.layout.read() as txn:
            revision = self.layout.revision(txn)
        try:
            self.layout.copy_to(path)
        except (OSError, lmdb.Error) as error:   # the disk filled, the folder went away...
            raise FailedPrecondition(f"backup to {quoted(str(path))} failed: {error}; nothing in the store "
                                     f"changed") from None
        return {"path": str(path.resolve()), "bytes": (path / "data.mdb").stat().st_size, "revision": revision,
                "seconds": time.monotonic() - started}

