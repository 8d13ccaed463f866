"""Tenants: registration with adapter validation, reading, listing, deletion and adapter export."""
from __future__ import annotations

import logging
import time

import lmdb

from models.adapter_format import DEFAULT_TARGETS, parse_adapter, random_adapter, serialize_adapter
from services.common.errors import InvalidArgument, NotFound, StaleVersion
from services.knowledge_store import idempotency
from services.knowledge_store.records import TenantRecord
from services.knowledge_store.store_base import StoreBase
from services.knowledge_store.store_settings import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    check_name,
)

log = logging.getLogger("hmi.store")


class TenantsPart(StoreBase):
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
            record, previous = self.write_tenant(txn, tenant_id, domain, labels, adapter, adapter_bytes, seed)
            return (record, previous), record.adapter_version, record.to_json()

        record, previous = idempotency.write_once(
            self.layout, request_id, "put_tenant", tenant_id, write,
            lambda earlier: (TenantRecord.from_json(earlier.result, self.settings.model_name), None))
        log.info("%s tenant %s (domain %s, %d labels, rank %d, version %d)",
                 "replaced" if previous else "registered", tenant_id, domain, len(labels), adapter.rank,
                 record.adapter_version)
        return record

    def write_tenant(self, txn: lmdb.Transaction, tenant_id: str, domain: str, labels: list[str], adapter,
                     adapter_bytes: bytes, seed: int = 0) -> tuple[TenantRecord, TenantRecord | None]:
        """The tenant's record and adapter in the caller's transaction (registration, or a fine-tuning job that
        succeeded); the adapter was validated by the caller. Returns the new record and the one it replaced."""
        domain_record = self.domain_in(txn, domain)
        if domain_record is None:
            raise NotFound(f"domain {domain!r} was deleted meanwhile")
        previous = self._tenant_in(txn, tenant_id)
        revision = self.layout.record_change(txn, "tenant", tenant_id)
        record = TenantRecord(
            tenant_id=tenant_id, domain=domain, labels=labels, adapter_version=revision,
            adapter_bytes=len(adapter_bytes), rank=adapter.rank, targets=list(adapter.targets),
            layers=adapter.layers, updated_at=time.time(), split_layer=domain_record.split_layer, seed=seed,
            model=domain_record.model)
        self.layout.put_json(txn, "tenants", tenant_id, record.to_json())
        txn.put(tenant_id.encode(), adapter_bytes, db=self.layout.db["adapters"])
        return record, previous

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
        """A page after `after` and the total. Unfiltered, a page reads only its own records (the total is the
        table's entry count), so paging through 100,000 tenants stays linear (gateways do it at start)."""
        with self.layout.read() as txn:
            if not domain:
                total = txn.stat(self.layout.db["tenants"])["entries"]
                selected = []
                for tenant_id, record in self.layout.iter_json(txn, "tenants", start=after):
                    if limit and len(selected) >= limit:
                        break
                    if tenant_id > after:
                        selected.append(TenantRecord.from_json(record, self.settings.model_name))
                return selected, total
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

