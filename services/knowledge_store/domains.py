"""Domains: their specs, PLOT builds with the bridge a build distils, lower-layer adaptation, reading and
deleting them. A build computes outside any transaction and swaps its result in with one write."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import lmdb

from models.bridge import bridge_cost_in_layers
from models.split_defaults import default_split
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, StaleVersion
from services.common.limits import MAX_CONTEXT
from services.knowledge_store import idempotency
from services.knowledge_store import knowledge_tree as tree
from services.knowledge_store.bridge_distillation import DistillSettings, distill
from services.knowledge_store.domain_adaptation import AdaptSettings, adapt_lower_layers
from services.knowledge_store.plot_builder import BuildSettings, Progress
from services.knowledge_store.records import AdaptReport, BridgeReport, DomainRecord, DomainStatus
from services.knowledge_store.store_base import StoreBase
from services.knowledge_store.store_settings import (
    check_name,
)

log = logging.getLogger("hmi.store")


class DomainsPart(StoreBase):
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

