"""The state every part of the knowledge store works on (one LMDB layout, the models it serves, the
traffic log) and the reading of domain records they all need.

The parts (domains.py, lookups.py, tenants.py) are mixins of one KnowledgeStore (store.py), so a part may
call another through `self`: a domain rebuild checks its tenants, a tenant registration its domain."""
from __future__ import annotations

import logging
import threading

import lmdb
import numpy as np

from models.dims import ModelDims
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, StaleVersion
from services.knowledge_store import knowledge_tree as tree
from services.knowledge_store.layout import StoreLayout
from services.knowledge_store.lower_models import LowerModels
from services.knowledge_store.plot_builder import PlotBuilder
from services.knowledge_store.records import DomainRecord
from services.knowledge_store.store_settings import (
    StoreSettings,
)
from services.knowledge_store.tree_learning import TrafficLog
from services.knowledge_store.tree_maintenance import TreeMaintenance

log = logging.getLogger("hmi.store")


class StoreBase:
    settings: StoreSettings
    layout: StoreLayout
    model_dims: dict[str, ModelDims]
    lower_models: LowerModels
    traffic: TrafficLog
    maintenance: TreeMaintenance
    _build_lock: threading.Lock

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

    def _find_domain(self, name: str) -> DomainRecord | None:
        with self.layout.read() as txn:
            return self.domain_in(txn, name)

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

