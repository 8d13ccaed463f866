"""Knowledge-store logic: domains and their PLOT, tenants and adapters, over one LMDB environment.

No gRPC here: the servicer, the tests and the studies call this directly. Every write is one LMDB
transaction, so a killed process loses nothing committed and readers never see half a write. Records
are typed (records.py); tree maintenance (tree_maintenance.py) works through the public methods below.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import lmdb
import numpy as np

from models.adapter_format import DEFAULT_TARGETS, parse_adapter, random_adapter, serialize_adapter
from models.bridge import bridge_cost_in_layers
from models.dims import ModelDims
from models.split_defaults import default_split
from services.common.codec import positions_in_sequences
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, StaleVersion, quoted
from services.common.limits import DEFAULT_MAX_RANK, MAX_CONTEXT
from services.knowledge_store import idempotency
from services.knowledge_store import knowledge_tree as tree
from services.knowledge_store.access_records import AccessRecords
from services.knowledge_store.bridge_distillation import DistillSettings, distill
from services.knowledge_store.change_followers import ChangeFollowers
from services.knowledge_store.domain_adaptation import AdaptSettings, adapt_lower_layers
from services.knowledge_store.knowledge_tree import LookupResult
from services.knowledge_store.layout import StoreLayout, keep_private, node_key
from services.knowledge_store.lower_models import LowerModels
from services.knowledge_store.plot_builder import BuildSettings, PlotBuilder, Progress
from services.knowledge_store.position_offsets import apply_chain_offsets
from services.knowledge_store.records import AdaptReport, BridgeReport, DomainRecord, DomainStatus, TenantRecord
from services.knowledge_store.tree_learning import TrafficLog
from services.knowledge_store.tree_maintenance import TreeMaintenance
from services.knowledge_store.tree_stamp import tree_stamp

log = logging.getLogger("hmi.store")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_LABELS = 1000
MAX_LABEL_CHARS = 256
CHANGES_PER_REPLY = 10_000   # change-log entries one ListChanges answer holds at most by default
LOOKUP_SLICE_TOKENS = 8192   # a streamed lookup computes and sends this many tokens' rows at a time
MAX_REPORTED_NODES = 1_000_000   # nodes one RecordTraffic call may count


@dataclass
class StoreSettings:
    data_dir: Path
    model_dir: Path
    model_name: str
    map_size: int = 1 << 30                   # initial LMDB map; grown (doubling) up to max_map_size
    max_map_size: int = 64 << 30
    default_rank: int = 8
    max_rank: int = DEFAULT_MAX_RANK          # what compute's adapter slots hold (both read HMI_MAX_RANK)
    max_corpus_bytes: int = 256 << 20
    max_adapter_bytes: int = 256 << 20
    max_lookup_tokens: int = 1 << 16          # rows one Lookup may ask for (64 Ki tokens: 48 MiB at hidden 384)
    max_adapt_steps: int = 5000
    max_adapt_batch: int = 64
    follower_wait: float = 2.0                # a write waits at most this long for gateways to read it
    max_sequence_tokens: int = 128
    default_budget_bytes: int = 512 << 20     # per domain: 100 domains in 50 GiB
    default_learn_threshold: int = 8          # lookups of a missing context before it is materialised
    learn_interval: float = 2.0               # seconds between flushes of the traffic log
    max_pending_contexts: int = 50_000        # distinct missing contexts counted per domain between flushes
    max_traffic_entries: int = 200_000        # counted contexts kept per domain in LMDB
    max_materialize: int = 1024               # contexts materialised per flush (the rest on their next lookup)
    extra_models: dict[str, Path] = field(default_factory=dict)   # more base models: name -> folder


@dataclass
class ChangeFeed:
    """Changes after a reader's revision; `complete` False: the reader must drop everything it cached."""
    store_id: str
    revision: int
    changes: list[tuple[int, str, str]]       # (revision, "tenant" | "domain", name)
    complete: bool


def check_name(kind: str, name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidArgument(f"{kind} {quoted(name)} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
                              f"starting with a letter or digit")
    return name


class KnowledgeStore:
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

    # ---- models --------------------------------------------------------------------------------

    def model_name(self, requested: str = "") -> str:
        """A model this store serves ('' = the default one)."""
        name = requested or self.settings.model_name
        if name not in self.model_dims:
            raise InvalidArgument(f"base model {name!r} is not served by this deployment (models: "
                                  f"{', '.join(self.model_dims)}); start it with --model {name}=DIR")
        return name

    def dims_of(self, record: DomainRecord) -> ModelDims:
        """The dimensions of the model a domain belongs to."""
        if record.model not in self.model_dims:
            raise FailedPrecondition(f"{record.name!r} belongs to base model {record.model!r}, which this store was "
                                     f"not started with (--model {record.model}=DIR)")
        return self.model_dims[record.model]

    def lower_model(self, record: DomainRecord) -> PlotBuilder:
        """The builder running the domain's lower model: the base one, or its domain-adapted layers."""
        self.model_name(record.model)
        return self.lower_models.of(record)

    # ---- domain records: what tree maintenance works with -------------------------------------

    def domain_in(self, txn: lmdb.Transaction, name: str) -> DomainRecord | None:
        """The domain's record as the transaction sees it."""
        data = self.layout.get_json(txn, "domains", name)
        return None if data is None else DomainRecord.from_json(data, self.settings.model_name)

    def save_domain(self, txn: lmdb.Transaction, record: DomainRecord) -> None:
        self.layout.put_json(txn, "domains", record.name, record.to_json())

    def ancestry(self, txn: lmdb.Transaction, record: DomainRecord) -> list[int]:
        """The domain's id, then its ancestors' (where lookups fall back)."""
        return [link.id for link in self.chain_records(txn, record)]

    def chain_records(self, txn: lmdb.Transaction, record: DomainRecord) -> list[DomainRecord]:
        chain = [record]
        while record.parent:
            record = self.domain_in(txn, record.parent)
            if record is None:
                break
            chain.append(record)
        return chain

    def position_offsets(self, record: DomainRecord) -> np.ndarray | None:
        """The domain's position-offset table (position_offsets.py), None when built without."""
        with self.layout.read() as txn:
            table = tree.read_offsets(self.layout, txn, record.id)
            return None if table is None else table.copy()

    def effective_budget(self, budget_bytes: int) -> int:
        return budget_bytes or self.settings.default_budget_bytes

    def learns(self, record: DomainRecord) -> bool:
        """Whether the domain's tree learns from traffic."""
        return self.effective_threshold(record.learn_threshold) > 0

    def _domain_at(self, txn: lmdb.Transaction, domain: str, revision: int) -> DomainRecord:
        """The domain's record; NotFound, or StaleVersion when `revision` (0 = any) is no longer its own."""
        record = self.domain_in(txn, domain)
        if record is None:
            raise NotFound(f"domain {domain!r} does not exist")
        if revision and record.revision != revision:
            raise StaleVersion(f"domain {domain!r} is at revision {record.revision}, not {revision}: it was rebuilt "
                               f"or replaced since the request was resolved")
        return record

    def effective_threshold(self, learn_threshold: int) -> int:
        """-1: not learning from traffic."""
        threshold = learn_threshold or self.settings.default_learn_threshold
        return threshold if threshold > 0 else -1

    # ---- domains -------------------------------------------------------------------------------

    def requested_split_layer(self, name: str, requested: int, model: str = "") -> int:
        """A negative L means the default: a rebuilt domain keeps its L; a new one gets its model's (half the
        layers for encoders, 0 for decoders: `models.split_defaults`)."""
        check_name("domain", name)
        if requested >= 0:
            return requested
        if requested != -1:
            raise InvalidArgument(f"split layer {requested} is negative: give 0..N-1, or -1 (or nothing) for the "
                                  f"default")
        existing = self._find_domain(name)
        if existing is not None:
            return existing.split_layer
        return default_split(self.model_dims[self.model_name(model)]).split_layer

    def requested_context(self, name: str, requested: int, model: str = "") -> int:
        """0 means the default: a rebuilt domain keeps its k; a new one gets its model's."""
        if requested != 0:
            return requested
        existing = self._find_domain(name)
        if existing is not None:
            return existing.context
        return default_split(self.model_dims[self.model_name(model)]).context

    def validate_domain_spec(self, name: str, parent: str, split_layer: int, context: int, min_count: int,
                             budget_bytes: int = 0, learn_threshold: int = 0,
                             model: str = "") -> DomainRecord | None:
        """Checks a spec against the model and the parent; returns the parent's record (None: a root)."""
        check_name("domain", name)
        dims = self.model_dims[self.model_name(model)]
        if not 0 <= split_layer < dims.layers:
            raise InvalidArgument(f"split layer {split_layer} is outside 0..{dims.layers - 1} "
                                  f"(base model {self.model_name(model)!r} has {dims.layers} layers)")
        if not 1 <= context <= MAX_CONTEXT:
            raise InvalidArgument(f"context depth {context} is outside 1..{MAX_CONTEXT}")
        if min_count < 1:
            raise InvalidArgument(f"min count {min_count} must be at least 1")
        if budget_bytes < 0 or learn_threshold < -1:
            raise InvalidArgument("budget bytes must be >= 0 (0 = default) and learn threshold >= -1 (-1 = off)")
        parent_record = None
        if parent and parent != "general":
            if parent == name:
                raise InvalidArgument("a domain cannot be its own parent")
            parent_record = self.get_domain(parent)
            if parent_record.model != self.model_name(model):
                raise InvalidArgument(f"a child domain must use its parent's base model: {parent!r} belongs to "
                                      f"{parent_record.model!r}")
            if parent_record.split_layer != split_layer or split_layer == 0:
                raise InvalidArgument(f"a child domain must use its parent's split layer (> 0): {parent!r} has "
                                      f"split layer {parent_record.split_layer}, this spec {split_layer}")
            ancestor = parent_record
            while ancestor.parent:
                if ancestor.parent == name:
                    raise InvalidArgument(f"parent {parent!r} descends from {name!r}: domains form a tree")
                ancestor = self.get_domain(ancestor.parent)
        vocabulary_bytes = dims.vocab * dims.hidden * 2
        if split_layer > 0 and parent_record is None and self.effective_budget(budget_bytes) < vocabulary_bytes:
            raise InvalidArgument(f"budget of {self.effective_budget(budget_bytes)} bytes cannot hold the "
                                  f"{dims.vocab} depth-1 rows of a root domain ({vocabulary_bytes} bytes)")
        return parent_record

    def bridge_settings(self, model: str, split_layer: int, no_bridge: bool = False,
                        requested: DistillSettings | None = None) -> DistillSettings | None:
        """The bridge a build distils: by default every encoder domain with a PLOT gets one; decoders never
        (a bridge mixes a whole sequence, which a generating decoder does not have yet)."""
        if split_layer == 0 or no_bridge:
            return None
        if self.model_dims[self.model_name(model)].is_decoder:
            if requested is not None:
                raise InvalidArgument(f"domain bridges are for encoder models; {self.model_name(model)!r} is a "
                                      f"decoder (build with --no-bridge)")
            return None
        settings = requested or DistillSettings()
        settings.validate()
        return settings

    def build_domain(self, name: str, corpus: str, *, parent: str = "", split_layer: int = -1, context: int = 0,
                     min_count: int = 2, budget_bytes: int = 0, learn_threshold: int = 0,
                     position_offsets: bool = True, progress: Progress | None = None,
                     model: str = "", request_id: str = "", no_bridge: bool = False,
                     bridge: DistillSettings | None = None) -> DomainStatus:
        """Computes the PLOT (and distils its bridge) outside any transaction, then swaps both in with one
        write transaction.

        With a `request_id` already applied, answers the first build's record without building again."""
        earlier = idempotency.already_applied(self.layout, request_id, "build_domain", name)
        if earlier is not None:
            return self._status(self._replayed_domain(earlier))
        split_layer = self.requested_split_layer(name, split_layer, model)
        context = self.requested_context(name, context, model)
        parent_record = self.validate_domain_spec(name, parent, split_layer, context, min_count, budget_bytes,
                                                  learn_threshold, model)
        model = self.model_name(model)
        dims = self.model_dims[model]
        lines = corpus.splitlines()
        if split_layer > 0 and not any(line.strip() for line in lines):
            raise InvalidArgument("the corpus is empty: give at least one non-empty line of text")
        distillation = self.bridge_settings(model, split_layer, no_bridge, bridge)
        with self._build_lock:
            started = time.time()
            existing = self._find_domain(name)
            if existing is not None:
                self._check_rebuild(existing, split_layer, model)
            contents = None
            distilled = None
            if split_layer > 0:
                builder = self.lower_model(existing) if existing else self.lower_models.base(model)
                settings = BuildSettings(split_layer, context, min_count, self.settings.max_sequence_tokens,
                                         position_offsets=position_offsets,
                                         capture_tokens=distillation.max_tokens_total if distillation else 0)
                contents = builder.build(lines, settings, progress, full_vocabulary=parent_record is None)
                if distillation is not None and contents.held_out is not None and len(contents.held_out[0]) < 2:
                    log.info("domain %s: a corpus of fewer than 2 sequences is too small to distil a bridge", name)
                elif distillation is not None and contents.held_out is not None:
                    rows, targets = contents.held_out
                    contents.held_out = None       # distill releases the lists' rows as it packs them
                    distilled = distill(rows, targets, dims.hidden, distillation,
                                        (lambda stage, done, total, loss: progress(stage, done, total, loss))
                                        if progress else None, release=True)
                    log.info("domain %s: bridge distilled in %d steps (%s %d), %.0fs", name, distilled.steps,
                             "stopped early: the stopping set's error no longer improved, of at most"
                             if distilled.stopped_early else "of", distilled.planned_steps, distilled.seconds)
                    if not distilled.loss_after < distilled.loss_before:
                        log.warning("domain %s: the distilled bridge did not lower the held-out error (%.4f -> %.4f):"
                                    " not kept, the domain serves plain PLOT rows", name, distilled.loss_before,
                                    distilled.loss_after)
                        distilled = None
            if progress:
                progress("writing", 0, 1)

            def write(txn: lmdb.Transaction) -> tuple[DomainRecord, int, dict]:
                previous = self.domain_in(txn, name)
                domain_id = previous.id if previous else self.layout.next_domain_id(txn)
                if contents is not None:
                    tree.write_tree(self.layout, txn, domain_id, contents)
                else:
                    tree.clear_domain(self.layout, txn, domain_id)
                per_depth = [0] * context
                tokens = 0
                for path, count in zip(contents.paths, contents.counts.tolist()) if contents else ():
                    per_depth[len(path) - 1] += 1
                    tokens += count if len(path) == 1 else 0
                record = DomainRecord(
                    id=domain_id, name=name, parent=parent if parent_record else "", split_layer=split_layer,
                    context=context, min_count=min_count, budget_bytes=budget_bytes, learn_threshold=learn_threshold,
                    model=model, hidden_size=dims.hidden, nodes=sum(per_depth), nodes_per_depth=per_depth,
                    rows=sum(per_depth), plot_bytes=sum(per_depth) * dims.hidden * 2, materialized=0, pruned=0,
                    traffic_entries=0, corpus_sequences=sum(1 for line in lines if line.strip()),
                    corpus_tokens=tokens, built_at=time.time(),
                    generation=(previous.generation if previous else 0) + 1,
                    lower_model=previous.lower_model if previous else "base",
                    position_offsets=contents is not None and contents.offsets is not None,
                    adapt=previous.adapt if previous else None)
                self.maintenance.prune(txn, record)
                record.revision = self.layout.record_change(txn, "domain", name)
                if distilled is not None:
                    txn.put(name.encode(), distilled.weights, db=self.layout.db["bridges"])
                    record.bridge = BridgeReport(
                        revision=record.revision, heads=distilled.shape.heads, head_dim=distilled.shape.head_dim,
                        ffn=distilled.shape.ffn, steps=distilled.steps, sequences=distilled.sequences,
                        tokens=distilled.tokens, loss_before=distilled.loss_before, loss_after=distilled.loss_after,
                        seconds=distilled.seconds,
                        cost_in_layers=bridge_cost_in_layers(distilled.shape, dims.intermediate),
                        bytes=len(distilled.weights))
                else:
                    txn.delete(name.encode(), db=self.layout.db["bridges"])
                self.save_domain(txn, record)
                return record, record.revision, record.to_json()

            record = idempotency.write_once(self.layout, request_id, "build_domain", name, write,
                                            self._replayed_domain)
            self.traffic.forget(record.id)
            if progress:
                progress("writing", 1, 1)
            log.info("built domain %s: L=%d k=%d nodes=%d (%s per depth) %.1f MiB in %.1fs (%s lower model)", name,
                     split_layer, context, record.nodes, record.nodes_per_depth, record.plot_bytes / 2**20,
                     time.time() - started, record.lower_model)
            if record.bridge is not None:
                log.info("domain %s bridge: %d steps on %d sequences, held-out error %.4f -> %.4f, %.2f layers of "
                         "compute per token, %.0fs", name, record.bridge.steps, record.bridge.sequences,
                         record.bridge.loss_before, record.bridge.loss_after, record.bridge.cost_in_layers,
                         record.bridge.seconds)
            return self._status(record)

    def _check_rebuild(self, existing: DomainRecord, split_layer: int, model: str,
                       lower_model: str | None = None) -> None:
        if existing.model != model:
            users = [t.tenant_id for t in self.list_tenants(existing.name)[0]]
            children = [d.name for d in self.list_domains() if d.parent == existing.name]
            if users or children:
                raise FailedPrecondition(f"domain {existing.name!r} belongs to base model {existing.model!r}"
                                         f" and has tenants or children; delete them before moving it to {model!r}")
        if (lower_model or existing.lower_model) == "adapted" and existing.split_layer != split_layer:
            raise InvalidArgument(f"domain {existing.name!r} has a lower model adapted for split layer "
                                  f"{existing.split_layer}; build it with --split-layer "
                                  f"{existing.split_layer} or adapt it again")
        if existing.split_layer != split_layer:
            children = [d.name for d in self.list_domains() if d.parent == existing.name]
            if children:
                raise FailedPrecondition(f"domain {existing.name!r} is the parent of {children[0]!r}, which "
                                         f"needs split layer {existing.split_layer}")

    def adapt_domain(self, name: str, corpus: str, *, parent: str = "", split_layer: int = 1,
                     settings: AdaptSettings | None = None,
                     progress: Callable[[str, int, int, float], None] | None = None,
                     model: str = "", request_id: str = "") -> DomainStatus:
        """MLM-adapts the lower layers on the corpus and stores them as the domain's lower model.

        A new domain is created without a PLOT (build it next); an existing one keeps serving its current
        PLOT until it is rebuilt, unless the split layer changes (then the old PLOT no longer fits)."""
        earlier = idempotency.already_applied(self.layout, request_id, "adapt_domain", name)
        if earlier is not None:
            return self._status(self._replayed_domain(earlier))
        parent_record = self.validate_domain_spec(name, parent, split_layer, 1, 1, model=model)
        model = self.model_name(model)
        if self.model_dims[model].is_decoder:
            raise FailedPrecondition(f"domain adaptation (masked-LM) is for encoder models; {model!r} is a decoder")
        if split_layer < 1:
            raise InvalidArgument("domain adaptation needs split layer >= 1 (0 means no lower model)")
        settings = settings or AdaptSettings(split_layer)
        settings.split_layer = split_layer
        if not 1 <= settings.steps <= self.settings.max_adapt_steps:
            raise InvalidArgument(f"adaptation steps {settings.steps} outside 1..{self.settings.max_adapt_steps} "
                                  f"(the store's --max-adapt-steps)")
        if not 1 <= settings.batch_size <= self.settings.max_adapt_batch:
            raise InvalidArgument(f"adaptation batch size {settings.batch_size} outside "
                                  f"1..{self.settings.max_adapt_batch} (the store's --max-adapt-batch)")
        lines = [line.strip() for line in corpus.splitlines() if line.strip()]
        with self._build_lock:
            existing = self._find_domain(name)
            if existing is not None and existing.split_layer != split_layer:
                users = [t.tenant_id for t in self.list_tenants(name)[0]]
                if users:
                    raise FailedPrecondition(f"domain {name!r} serves {len(users)} tenant(s) at split layer "
                                             f"{existing.split_layer}; adapt it for that layer or delete them")
                self._check_rebuild(existing, split_layer, model, lower_model="base")
            builder = self.lower_models.base(model)
            sequences = builder.tokenize(lines, settings.max_tokens) if lines else []
            result = adapt_lower_layers(builder.model, builder.tokenizer, sequences, settings, progress)

            def write(txn: lmdb.Transaction) -> tuple[DomainRecord, int, dict]:
                record = self.domain_in(txn, name)
                if record is None or record.split_layer != split_layer:
                    domain_id = record.id if record else self.layout.next_domain_id(txn)
                    tree.clear_domain(self.layout, txn, domain_id)
                    record = DomainRecord(
                        id=domain_id, name=name, parent=parent if parent_record else "", split_layer=split_layer,
                        context=1, min_count=1, model=model, hidden_size=self.model_dims[model].hidden,
                        generation=(record.generation if record else 0) + 1)
                record.lower_model = "adapted"
                record.adapt = AdaptReport(steps=result.steps, corpus_sequences=result.corpus_sequences,
                                           base_loss=result.base_loss, adapted_loss=result.adapted_loss,
                                           seconds=result.seconds, adapted_at=time.time())
                txn.put(name.encode(), result.weights, db=self.layout.db["lower"])
                record.revision = self.layout.record_change(txn, "domain", name)
                self.save_domain(txn, record)
                return record, record.revision, record.to_json()

            record = idempotency.write_once(self.layout, request_id, "adapt_domain", name, write,
                                            self._replayed_domain)
        log.info("adapted domain %s lower layers [0, %d): %d steps on %d sequences in %.0fs, held-out MLM loss "
                 "%.3f -> %.3f", name, split_layer, result.steps, len(sequences), result.seconds, result.base_loss,
                 result.adapted_loss)
        return self._status(record)

    def _find_domain(self, name: str) -> DomainRecord | None:
        with self.layout.read() as txn:
            return self.domain_in(txn, name)

    def _replayed_domain(self, earlier: idempotency.Applied) -> DomainRecord:
        """What the first call of a request id answered (a build or an adaptation)."""
        return DomainRecord.from_json(earlier.result, self.settings.model_name)

    def get_domain(self, name: str) -> DomainStatus:
        check_name("domain", name)
        record = self._find_domain(name)
        if record is None:
            raise NotFound(f"domain {name!r} does not exist; create it with `hmi domain build {name} --corpus FILE`")
        return self._status(record)

    def _status(self, record: DomainRecord) -> DomainStatus:
        return DomainStatus(**{f.name: getattr(record, f.name) for f in dataclasses.fields(DomainRecord)},
                            recent_hit_depths=self.traffic.recent_hit_depths(record.id, record.context),
                            effective_budget=self.effective_budget(record.budget_bytes),
                            effective_threshold=self.effective_threshold(record.learn_threshold))

    def list_domains(self) -> list[DomainStatus]:
        with self.layout.read() as txn:
            return [self._status(DomainRecord.from_json(data, self.settings.model_name))
                    for _, data in self.layout.iter_json(txn, "domains")]

    def delete_domain(self, name: str, request_id: str = "") -> None:
        """With a `request_id` already applied, answers as the first call did (the domain is gone)."""
        check_name("domain", name)

        def write(txn: lmdb.Transaction) -> tuple[DomainRecord | None, int, dict]:
            record = self.domain_in(txn, name)
            if record is None:
                raise NotFound(f"domain {name!r} does not exist")
            users = [tid for tid, tenant in self.layout.iter_json(txn, "tenants") if tenant["domain"] == name]
            if users:
                raise FailedPrecondition(f"domain {name!r} still has {len(users)} tenant(s) (e.g. {users[0]!r}); "
                                         f"delete them first")
            children = [d for _, d in self.layout.iter_json(txn, "domains") if d.get("parent") == name]
            if children:
                raise FailedPrecondition(f"domain {name!r} is the parent of {children[0]['name']!r}; delete it first")
            tree.clear_domain(self.layout, txn, record.id)
            txn.delete(name.encode(), db=self.layout.db["lower"])
            txn.delete(name.encode(), db=self.layout.db["bridges"])
            txn.delete(name.encode(), db=self.layout.db["domains"])
            return record, self.layout.record_change(txn, "domain", name), {}

        record = idempotency.write_once(self.layout, request_id, "delete_domain", name, write, lambda _earlier: None)
        if record is not None:
            self.traffic.forget(record.id)
            log.info("deleted domain %s", name)

    def lookup(self, domain: str, token_ids: np.ndarray, offsets: np.ndarray, context: int = 0,
               first_positions: np.ndarray | None = None, context_tokens: np.ndarray | None = None,
               domain_revision: int = 0, raw: bool = False, known_stamp: str = "") -> tuple[DomainRecord, LookupResult]:
        """`context` (0 = the domain's) may cap the depth: the accuracy study reads one tree at every k.

        `raw` (for a row cache, tree_stamp.py): rows without position offsets, the result's `stamp`, and the
        chain's offset tables in `offset_tables` unless the tree is at `known_stamp`.

        A generating decoder sends a window of recent tokens per sequence: `first_positions` gives the
        position of each window's first token in its text (for position offsets) and `context_tokens` how
        many leading tokens are only left context; the result then holds the other tokens' rows only.
        `domain_revision` (0 = any) must be the domain's current one: a caller that resolved an older build
        (or a deleted domain of the same name) gets StaleVersion, never another tree's rows."""
        check_name("domain", domain)
        if len(token_ids) > self.settings.max_lookup_tokens:
            raise InvalidArgument(f"lookup of {len(token_ids)} tokens exceeds the limit of "
                                  f"{self.settings.max_lookup_tokens} (the store's --max-lookup-tokens); split it")
        with self.layout.read(buffers=True) as txn:
            record = self._domain_at(txn, domain, domain_revision)
            vocab = self.dims_of(record).vocab
            if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= vocab):
                raise InvalidArgument(f"token ids must lie in [0, {vocab})")
            if record.split_layer == 0:
                raise FailedPrecondition(f"domain {domain!r} has split layer 0: it has no PLOT to look up")
            if not record.built_at:
                raise FailedPrecondition(f"domain {domain!r} has no PLOT yet: run `hmi domain build {domain} "
                                         f"--corpus FILE --split-layer {record.split_layer}`")
            learning_domain = self.learns(record)
            learning = not context and learning_domain
            cap = min(context or MAX_CONTEXT, record.context)
            chain_records = self.chain_records(txn, record)
            chain = [link.id for link in chain_records]
            skip = None if context_tokens is None else context_tokens.tolist()
            result = tree.lookup(self.layout, txn, chain, cap, record.hidden_size, token_ids, offsets,
                                 collect=learning, skip=skip)
            within = positions_in_sequences(offsets)
            positions = within if first_positions is None else within + np.repeat(first_positions, np.diff(offsets))
            if skip is not None:
                wanted = within >= np.repeat(context_tokens, np.diff(offsets))
                result.vectors, result.hit_depths, result.owners = (result.vectors[wanted], result.hit_depths[wanted],
                                                                    result.owners[wanted])
                positions = positions[wanted]
            if raw:
                result.stamp = tree_stamp(self.layout.store_id, chain_records, learning_domain)
                result.learning = learning_domain
                if result.stamp != known_stamp:
                    result.offset_tables = {link: table.copy() for link, table in self._offset_tables(txn, chain)}
            elif len(result.vectors):   # each token gets the position offsets of the domain whose node served it
                tables = dict(self._offset_tables(txn, chain))
                result.vectors = apply_chain_offsets(result.vectors, result.owners, tables, cap, positions)
        self.traffic.record(record.id, result, token_ids, offsets, learning)
        return record, result

    def _offset_tables(self, txn: lmdb.Transaction, chain: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """(chain link, position-offset table) of each domain of the chain that has one (views into `txn`)."""
        for link, domain_id in enumerate(chain):
            table = tree.read_offsets(self.layout, txn, domain_id)
            if table is not None:
                yield link, table

    def lookup_slices(self, domain: str, token_ids: np.ndarray, offsets: np.ndarray,
                      first_positions: np.ndarray | None = None, context_tokens: np.ndarray | None = None,
                      domain_revision: int = 0, raw: bool = False, known_stamp: str = "",
                      slice_tokens: int = LOOKUP_SLICE_TOKENS) -> Iterator[tuple[DomainRecord, LookupResult]]:
        """The lookup a few thousand tokens (whole sequences) at a time, so a large answer streams out without
        being held in memory at once. A rebuild between two slices fails the call (StaleVersion: retry);
        traffic growth between slices is fine (every row is one the tree served at that moment)."""
        if len(token_ids) > self.settings.max_lookup_tokens:
            raise InvalidArgument(f"lookup of {len(token_ids)} tokens exceeds the limit of "
                                  f"{self.settings.max_lookup_tokens} (the store's --max-lookup-tokens); split it")
        first = None
        count = len(offsets) - 1
        start = 0
        while start < count:
            end = start + 1
            while end < count and offsets[end + 1] - offsets[start] <= slice_tokens:
                end += 1
            base = offsets[start]
            record, result = self.lookup(
                domain, token_ids[base:offsets[end]], offsets[start:end + 1] - base,
                first_positions=None if first_positions is None else first_positions[start:end],
                context_tokens=None if context_tokens is None else context_tokens[start:end],
                domain_revision=domain_revision, raw=raw, known_stamp=known_stamp)
            if first is None:
                first = record
                known_stamp = result.stamp   # later slices need no tables, only the same tree
            elif (record.id, record.generation) != (first.id, first.generation):
                raise StaleVersion(f"domain {domain!r} was rebuilt during the lookup; retry")
            elif raw and result.stamp != known_stamp:
                raise StaleVersion(f"domain {domain!r}'s tree changed during the lookup (rebuilt or pruned); retry")
            yield record, result
            start = end

    def record_cached_hits(self, domain: str, domain_revision: int, paths: np.ndarray, owners: np.ndarray,
                           counts: np.ndarray) -> str:
        """Counts tokens a row cache served (each row of `paths` a node's path, -1 past its depth, held by chain
        link `owners`) as this store's own lookups would have; returns the tree's current stamp."""
        check_name("domain", domain)
        if paths.ndim != 2 or not (len(paths) == len(owners) == len(counts)):
            raise InvalidArgument(f"paths [nodes, context], owners and counts must agree: {paths.shape}, "
                                  f"{len(owners)}, {len(counts)}")
        if len(paths) > MAX_REPORTED_NODES:
            raise InvalidArgument(f"{len(paths)} nodes reported at once; at most {MAX_REPORTED_NODES}")
        with self.layout.read(buffers=True) as txn:
            record = self._domain_at(txn, domain, domain_revision)
            chain = self.chain_records(txn, record)
            stamp = tree_stamp(self.layout.store_id, chain, self.learns(record))
        if not len(paths):
            return stamp
        depths = (paths >= 0).sum(axis=1)
        valid = paths[np.arange(paths.shape[1])[None, :] < depths[:, None]]
        if paths.shape[1] > record.context or depths.min() < 1 or (paths[:, 0] < 0).any():
            raise InvalidArgument(f"each path needs 1..{record.context} tokens (the domain's context), then -1")
        vocab = self.dims_of(record).vocab
        if valid.max() >= vocab or owners.max() >= len(chain) or counts.min() < 1 or counts.max() > 2**32:
            raise InvalidArgument(f"token ids must lie in [0, {vocab}), owners in [0, {len(chain)}) and counts in "
                                  f"[1, 2^32]")
        keys: Counter | None = None
        if self.learns(record):   # node counts matter only to a learning tree
            keys = Counter()
            for path, depth, owner, count in zip(paths.tolist(), depths.tolist(), owners.tolist(), counts.tolist()):
                keys[node_key(chain[owner].id, tuple(path[:depth]))] += count
        depth_counts = np.bincount(depths, weights=counts, minlength=record.context + 1)[1:].astype(np.int64)
        self.traffic.record_hits(record.id, keys, depth_counts)
        return stamp

    # ---- tenants -------------------------------------------------------------------------------

    def put_tenant(self, tenant_id: str, domain: str, labels: list[str], adapter_bytes: bytes | None = None,
                   *, rank: int = 0, seed: int = 0, model: str = "", request_id: str = "",
                   has_adapter: bool = False) -> TenantRecord:
        """Registers or replaces a tenant; the adapter is validated against the model and the labels, and its rank
        against what the deployment's computes accept (--max-rank). Its adapter version is the change-log revision
        of this write: unique over the id's whole history, so no cache keyed by (tenant, version) can mistake a
        re-registered tenant for its deleted predecessor.

        The tenant's base model is its domain's; `model`, when given, must name the same one. `has_adapter`:
        the caller sent an adapter file, so an empty one is refused rather than replaced by a random adapter.
        With a `request_id` already applied, answers the first call's record without writing again."""
        check_name("tenant id", tenant_id)
        earlier = idempotency.already_applied(self.layout, request_id, "put_tenant", tenant_id)
        if earlier is not None:
            return TenantRecord.from_json(earlier.result, self.settings.model_name)
        labels = [label.strip() for label in labels]
        domain_record = self.get_domain(domain)
        model_of_domain = domain_record.model
        if model and model != model_of_domain:
            raise InvalidArgument(f"tenant {tenant_id!r} names base model {model!r} but domain {domain!r} belongs to "
                                  f"{model_of_domain!r}; pick a domain of {model!r} (hmi domain build NAME --model "
                                  f"{model} ...)")
        dims = self.dims_of(domain_record)
        if dims.is_decoder and labels:
            raise InvalidArgument(f"base model {model_of_domain!r} is a decoder ({dims.family}): its tenants generate "
                                  f"text and take no labels")
        if not dims.is_decoder and labels and not 2 <= len(labels) <= MAX_LABELS:
            raise InvalidArgument(f"a classifier needs 2..{MAX_LABELS} labels, got {len(labels)} (no labels: an "
                                  f"embedding-only tenant)")
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise InvalidArgument("labels must be non-empty and distinct")
        if any(len(label) > MAX_LABEL_CHARS for label in labels):
            raise InvalidArgument(f"labels must be at most {MAX_LABEL_CHARS} characters long")
        split_layer = domain_record.split_layer
        if has_adapter and not adapter_bytes:
            raise InvalidArgument("adapter: the file is empty (0 bytes); give a safetensors adapter, or none for a "
                                  "random one")
        if adapter_bytes:
            if len(adapter_bytes) > self.settings.max_adapter_bytes:
                raise InvalidArgument(f"adapter of {len(adapter_bytes)} bytes exceeds the limit of "
                                      f"{self.settings.max_adapter_bytes}")
            adapter = parse_adapter(adapter_bytes, dims, num_labels=len(labels), min_layer=split_layer)
        else:
            rank = rank or self.settings.default_rank
            if not 1 <= rank <= self.settings.max_rank:
                raise InvalidArgument(f"rank {rank} is outside 1..{self.settings.max_rank} (the largest rank this "
                                      f"deployment's compute services hold: the store's --max-rank)")
            adapter = random_adapter(dims, num_labels=len(labels), rank=rank, first_layer=split_layer,
                                     targets=DEFAULT_TARGETS, seed=seed or None)
            adapter_bytes = serialize_adapter(adapter)
        if adapter.lora and adapter.rank > self.settings.max_rank:
            raise InvalidArgument(f"adapter rank {adapter.rank} is above this deployment's limit of "
                                  f"{self.settings.max_rank}, the largest rank its compute services hold (compute's "
                                  f"and the store's --max-rank, HMI_MAX_RANK): retrain with a smaller rank or raise "
                                  f"the limit of both")

        def write(txn: lmdb.Transaction) -> tuple[tuple[TenantRecord, TenantRecord | None], int, dict]:
            if self.domain_in(txn, domain) is None:
                raise NotFound(f"domain {domain!r} was deleted meanwhile")
            previous = self._tenant_in(txn, tenant_id)
            revision = self.layout.record_change(txn, "tenant", tenant_id)
            record = TenantRecord(
                tenant_id=tenant_id, domain=domain, labels=labels, adapter_version=revision,
                adapter_bytes=len(adapter_bytes), rank=adapter.rank, targets=list(adapter.targets),
                layers=adapter.layers, updated_at=time.time(), split_layer=split_layer, seed=seed,
                model=model_of_domain)
            self.layout.put_json(txn, "tenants", tenant_id, record.to_json())
            txn.put(tenant_id.encode(), adapter_bytes, db=self.layout.db["adapters"])
            return (record, previous), revision, record.to_json()

        record, previous = idempotency.write_once(
            self.layout, request_id, "put_tenant", tenant_id, write,
            lambda earlier: (TenantRecord.from_json(earlier.result, self.settings.model_name), None))
        log.info("%s tenant %s (domain %s, %d labels, rank %d, version %d)",
                 "replaced" if previous else "registered", tenant_id, domain, len(labels), adapter.rank,
                 record.adapter_version)
        return record

    def _tenant_in(self, txn: lmdb.Transaction, tenant_id: str) -> TenantRecord | None:
        data = self.layout.get_json(txn, "tenants", tenant_id)
        return None if data is None else TenantRecord.from_json(data, self.settings.model_name)

    def get_tenant(self, tenant_id: str) -> TenantRecord:
        check_name("tenant id", tenant_id)
        with self.layout.read() as txn:
            record = self._tenant_in(txn, tenant_id)
        if record is None:
            raise NotFound(f"tenant {tenant_id!r} is not registered")
        return record

    def list_tenants(self, domain: str = "", limit: int = 0, after: str = "") -> tuple[list[TenantRecord], int]:
        with self.layout.read() as txn:
            selected, total = [], 0
            for tenant_id, record in self.layout.iter_json(txn, "tenants"):
                if domain and record["domain"] != domain:
                    continue
                total += 1
                if tenant_id > after and (not limit or len(selected) < limit):
                    selected.append(TenantRecord.from_json(record, self.settings.model_name))
        return selected, total

    def delete_tenant(self, tenant_id: str, request_id: str = "") -> None:
        """With a `request_id` already applied, answers as the first call did (the tenant is gone)."""
        check_name("tenant id", tenant_id)

        def write(txn: lmdb.Transaction) -> tuple[bool, int, dict]:
            if txn.get(tenant_id.encode(), db=self.layout.db["tenants"]) is None:
                raise NotFound(f"tenant {tenant_id!r} is not registered")
            txn.delete(tenant_id.encode(), db=self.layout.db["tenants"])
            txn.delete(tenant_id.encode(), db=self.layout.db["adapters"])
            return True, self.layout.record_change(txn, "tenant", tenant_id), {}

        if idempotency.write_once(self.layout, request_id, "delete_tenant", tenant_id, write, lambda _earlier: False):
            log.info("deleted tenant %s", tenant_id)

    def changes_after(self, revision: int, limit: int = CHANGES_PER_REPLY) -> ChangeFeed:
        """Tenants and domains written after `revision`, for caches elsewhere (the gateway's directory)."""
        with self.layout.read() as txn:
            changes, complete = self.layout.changes_after(txn, revision, limit)
            latest = self.layout.revision(txn)
        if revision > latest:
            complete = False    # the reader knew a newer log: the store was replaced by an older copy
        return ChangeFeed(self.layout.store_id, latest, changes, complete)

    def get_adapter(self, tenant_id: str, version: int = 0) -> tuple[TenantRecord, bytes]:
        check_name("tenant id", tenant_id)
        if version < 0:
            raise InvalidArgument(f"adapter version {version} is negative (0 = the current one)")
        with self.layout.read() as txn:
            record = self._tenant_in(txn, tenant_id)
            if record is None:
                raise NotFound(f"tenant {tenant_id!r} is not registered")
            if version and record.adapter_version != version:
                raise StaleVersion(f"tenant {tenant_id!r} has adapter version {record.adapter_version}, not {version}: "
                                   f"it was replaced since the request was resolved")
            data = txn.get(tenant_id.encode(), db=self.layout.db["adapters"])
        return record, bytes(data)

    def get_bridge(self, domain: str, revision: int = 0) -> tuple[DomainRecord, bytes]:
        """The domain's bridge (models/bridge.py safetensors); `revision` (0 = current) must be its own."""
        check_name("domain", domain)
        if revision < 0:
            raise InvalidArgument(f"bridge revision {revision} is negative (0 = the current one)")
        with self.layout.read() as txn:
            record = self.domain_in(txn, domain)
            if record is None:
                raise NotFound(f"domain {domain!r} does not exist")
            if record.bridge is None:
                raise NotFound(f"domain {domain!r} has no bridge (built with --no-bridge, split layer 0 or a decoder)")
            if revision and record.bridge.revision != revision:
                raise StaleVersion(f"domain {domain!r} has bridge revision {record.bridge.revision}, not {revision}: "
                                   f"it was rebuilt since the request was resolved")
            data = txn.get(domain.encode(), db=self.layout.db["bridges"])
        if data is None:
            raise NotFound(f"domain {domain!r} lists a bridge that is not stored; rebuild the domain")
        return record, bytes(data)

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
