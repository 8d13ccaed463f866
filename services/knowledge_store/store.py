"""Knowledge-store logic: domains and their PLOT, tenants and adapters, over one LMDB environment.

No gRPC here: the servicer, the tests and the CLI call this directly. Every write is one LMDB
transaction, so a killed process loses nothing committed and readers never see half a write.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.adapter_format import (DEFAULT_TARGETS, parse_adapter, random_adapter,
                                            serialize_adapter)
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.models import ModelDims, load_bert, load_tokenizer
from services.knowledge_store.knowledge_tree import LookupResult, lookup, write_tree
from services.knowledge_store.layout import StoreLayout, domain_prefix
from services.knowledge_store.plot_builder import BuildSettings, PlotBuilder, Progress

log = logging.getLogger("hmi.store")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_CONTEXT = 16
MAX_LABELS = 1000


@dataclass
class StoreSettings:
    data_dir: Path
    model_dir: Path
    model_name: str
    map_size: int = 64 << 30
    default_rank: int = 8
    max_corpus_bytes: int = 256 << 20
    max_adapter_bytes: int = 256 << 20
    max_lookup_tokens: int = 1 << 20
    max_sequence_tokens: int = 128


def check_name(kind: str, name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidArgument(f"{kind} {name!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
                              f"starting with a letter or digit")
    return name


class KnowledgeStore:
    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.layout = StoreLayout(settings.data_dir / "store.lmdb", settings.map_size)
        self.dims = ModelDims.from_dir(settings.model_dir)
        self._builder: PlotBuilder | None = None
        self._builder_lock = threading.Lock()
        self._build_lock = threading.Lock()

    def close(self) -> None:
        self.layout.close()

    # ---- domains -------------------------------------------------------------------------------

    def _plot_builder(self) -> PlotBuilder:
        with self._builder_lock:
            if self._builder is None:
                log.info("loading lower model from %s", self.settings.model_dir)
                self._builder = PlotBuilder(load_bert(self.settings.model_dir),
                                            load_tokenizer(self.settings.model_dir), self.dims.vocab)
            return self._builder

    def validate_domain_spec(self, name: str, parent: str, split_layer: int, context: int, min_count: int) -> None:
        check_name("domain", name)
        if not 0 <= split_layer < self.dims.layers:
            raise InvalidArgument(f"split layer {split_layer} is outside 0..{self.dims.layers - 1} "
                                  f"(the base model has {self.dims.layers} layers)")
        if not 1 <= context <= MAX_CONTEXT:
            raise InvalidArgument(f"context depth {context} is outside 1..{MAX_CONTEXT}")
        if min_count < 1:
            raise InvalidArgument(f"min count {min_count} must be at least 1")
        if parent and parent != "general":
            if parent == name:
                raise InvalidArgument("a domain cannot be its own parent")
            self.get_domain(parent)

    def build_domain(self, name: str, corpus: str, *, parent: str = "", split_layer: int = 2, context: int = 3,
                     min_count: int = 2, progress: Progress | None = None) -> dict[str, Any]:
        """Computes the PLOT outside any transaction, then swaps it in with one write transaction."""
        self.validate_domain_spec(name, parent, split_layer, context, min_count)
        lines = corpus.splitlines()
        if split_layer > 0 and not any(line.strip() for line in lines):
            raise InvalidArgument("the corpus is empty: give at least one non-empty line of text")
        with self._build_lock:
            started = time.time()
            tree = None
            tokens = 0
            if split_layer > 0:
                builder = self._plot_builder()
                settings = BuildSettings(split_layer, context, min_count, self.settings.max_sequence_tokens)
                tree = builder.build(lines, settings, progress)
                tokens = int(tree.counts[:self.dims.vocab].sum())
            if progress:
                progress("writing", 0, 1)
            with self.layout.env.begin(write=True) as txn:
                record = self.layout.get_json(txn, "domains", name)
                domain_id = record["id"] if record else self.layout.next_domain_id(txn)
                plot_bytes = write_tree(self.layout, txn, domain_id, tree) if tree is not None else 0
                per_depth = [0] * context
                if tree is not None:
                    for path in tree.paths:
                        per_depth[len(path) - 1] += 1
                record = {
                    "id": domain_id, "name": name, "parent": parent, "split_layer": split_layer,
                    "context": context, "min_count": min_count, "model": self.settings.model_name,
                    "hidden_size": self.dims.hidden, "nodes": sum(per_depth), "nodes_per_depth": per_depth,
                    "plot_bytes": plot_bytes, "corpus_sequences": sum(1 for line in lines if line.strip()),
                    "corpus_tokens": tokens, "built_at": time.time(),
                }
                self.layout.put_json(txn, "domains", name, record)
            if progress:
                progress("writing", 1, 1)
            log.info("built domain %s: L=%d k=%d nodes=%d (%s per depth) %.1f MiB in %.1fs", name, split_layer,
                     context, record["nodes"], per_depth, plot_bytes / 2**20, time.time() - started)
            return record

    def get_domain(self, name: str) -> dict[str, Any]:
        with self.layout.env.begin() as txn:
            record = self.layout.get_json(txn, "domains", name)
        if record is None:
            raise NotFound(f"domain {name!r} does not exist; create it with `hmi domain build {name} --corpus FILE`")
        return record

    def list_domains(self) -> list[dict[str, Any]]:
        with self.layout.env.begin() as txn:
            return [record for _, record in self.layout.iter_json(txn, "domains")]

    def delete_domain(self, name: str) -> None:
        with self.layout.env.begin(write=True) as txn:
            record = self.layout.get_json(txn, "domains", name)
            if record is None:
                raise NotFound(f"domain {name!r} does not exist")
            users = [tid for tid, tenant in self.layout.iter_json(txn, "tenants") if tenant["domain"] == name]
            if users:
                raise FailedPrecondition(f"domain {name!r} still has {len(users)} tenant(s) (e.g. {users[0]!r}); "
                                         f"delete them first")
            children = [d for _, d in self.layout.iter_json(txn, "domains") if d.get("parent") == name]
            if children:
                raise FailedPrecondition(f"domain {name!r} is the parent of {children[0]['name']!r}; delete it first")
            self.layout.delete_prefix(txn, "nodes", domain_prefix(record["id"]))
            self.layout.delete_prefix(txn, "blocks", domain_prefix(record["id"]))
            txn.delete(name.encode(), db=self.layout.db["domains"])
        log.info("deleted domain %s", name)

    def lookup(self, domain: str, token_ids: np.ndarray, offsets: np.ndarray) -> tuple[dict[str, Any], LookupResult]:
        if len(token_ids) > self.settings.max_lookup_tokens:
            raise InvalidArgument(f"lookup of {len(token_ids)} tokens exceeds the limit of "
                                  f"{self.settings.max_lookup_tokens}")
        if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= self.dims.vocab):
            raise InvalidArgument(f"token ids must lie in [0, {self.dims.vocab})")
        with self.layout.env.begin(buffers=True) as txn:
            record = self.layout.get_json(txn, "domains", domain)
            if record is None:
                raise NotFound(f"domain {domain!r} does not exist")
            if record["split_layer"] == 0:
                raise FailedPrecondition(f"domain {domain!r} has split layer 0: it has no PLOT to look up")
            result = lookup(self.layout, txn, record["id"], record["context"], record["hidden_size"],
                            token_ids, offsets)
        return record, result

    # ---- tenants -------------------------------------------------------------------------------

    def put_tenant(self, tenant_id: str, domain: str, labels: list[str], adapter_bytes: bytes | None = None,
                   *, rank: int = 0, seed: int = 0) -> dict[str, Any]:
        """Registers or replaces a tenant; the adapter is validated against the model and the labels."""
        check_name("tenant id", tenant_id)
        labels = [label.strip() for label in labels]
        if not 2 <= len(labels) <= MAX_LABELS:
            raise InvalidArgument(f"a classifier needs 2..{MAX_LABELS} labels, got {len(labels)}")
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise InvalidArgument("labels must be non-empty and distinct")
        domain_record = self.get_domain(domain)
        split_layer = domain_record["split_layer"]
        if adapter_bytes:
            if len(adapter_bytes) > self.settings.max_adapter_bytes:
                raise InvalidArgument(f"adapter of {len(adapter_bytes)} bytes exceeds the limit of "
                                      f"{self.settings.max_adapter_bytes}")
            adapter = parse_adapter(adapter_bytes, self.dims, num_labels=len(labels), min_layer=split_layer)
        else:
            adapter = random_adapter(self.dims, num_labels=len(labels), rank=rank or self.settings.default_rank,
                                     first_layer=split_layer, targets=DEFAULT_TARGETS, seed=seed or None)
            adapter_bytes = serialize_adapter(adapter)
        with self.layout.env.begin(write=True) as txn:
            if self.layout.get_json(txn, "domains", domain) is None:
                raise NotFound(f"domain {domain!r} was deleted meanwhile")
            previous = self.layout.get_json(txn, "tenants", tenant_id)
            record = {
                "tenant_id": tenant_id, "domain": domain, "labels": labels,
                "adapter_version": (previous["adapter_version"] + 1) if previous else 1,
                "adapter_bytes": len(adapter_bytes), "rank": adapter.rank, "targets": list(adapter.targets),
                "layers": adapter.layers, "updated_at": time.time(), "split_layer": split_layer, "seed": seed,
            }
            self.layout.put_json(txn, "tenants", tenant_id, record)
            txn.put(tenant_id.encode(), adapter_bytes, db=self.layout.db["adapters"])
        log.info("%s tenant %s (domain %s, %d labels, rank %d, version %d)",
                 "replaced" if previous else "registered", tenant_id, domain, len(labels), adapter.rank,
                 record["adapter_version"])
        return record

    def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        with self.layout.env.begin() as txn:
            record = self.layout.get_json(txn, "tenants", tenant_id)
        if record is None:
            raise NotFound(f"tenant {tenant_id!r} is not registered")
        return record

    def list_tenants(self, domain: str = "", limit: int = 0, after: str = "") -> tuple[list[dict[str, Any]], int]:
        with self.layout.env.begin() as txn:
            selected, total = [], 0
            for tenant_id, record in self.layout.iter_json(txn, "tenants"):
                if domain and record["domain"] != domain:
                    continue
                total += 1
                if tenant_id > after and (not limit or len(selected) < limit):
                    selected.append(record)
        return selected, total

    def delete_tenant(self, tenant_id: str) -> None:
        with self.layout.env.begin(write=True) as txn:
            if txn.get(tenant_id.encode(), db=self.layout.db["tenants"]) is None:
                raise NotFound(f"tenant {tenant_id!r} is not registered")
            txn.delete(tenant_id.encode(), db=self.layout.db["tenants"])
            txn.delete(tenant_id.encode(), db=self.layout.db["adapters"])
        log.info("deleted tenant %s", tenant_id)

    def get_adapter(self, tenant_id: str, version: int = 0) -> tuple[dict[str, Any], bytes]:
        with self.layout.env.begin() as txn:
            record = self.layout.get_json(txn, "tenants", tenant_id)
            if record is None:
                raise NotFound(f"tenant {tenant_id!r} is not registered")
            if version and record["adapter_version"] != version:
                raise FailedPrecondition(f"tenant {tenant_id!r} has adapter version {record['adapter_version']}, "
                                         f"not {version}")
            data = txn.get(tenant_id.encode(), db=self.layout.db["adapters"])
        return record, bytes(data)
