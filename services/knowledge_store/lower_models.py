"""The lower models the store runs (embeddings + layers [0, L)): one per base model, loaded on first use,
and the domain-adapted ones (a few cached), each wrapped in the PlotBuilder that runs it."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from models.dims import ModelDims
from models.loading import decoder_base, load_bert, load_causal_lm, load_tokenizer
from services.common.errors import FailedPrecondition
from services.knowledge_store.domain_adaptation import with_lower_layers
from services.knowledge_store.layout import StoreLayout
from services.knowledge_store.plot_builder import PlotBuilder
from services.knowledge_store.records import DomainRecord

log = logging.getLogger("hmi.store")
ADAPTED_CACHED = 4


class LowerModels:
    def __init__(self, layout: StoreLayout, model_dirs: dict[str, Path], model_dims: dict[str, ModelDims]) -> None:
        self.layout = layout
        self.model_dirs = model_dirs
        self.model_dims = model_dims
        self._base: dict[str, PlotBuilder] = {}
        self._adapted: dict[str, tuple[float, PlotBuilder]] = {}   # domain -> (adapted_at, builder)
        self._lock = threading.Lock()

    def base(self, model: str) -> PlotBuilder:
        """The base model's lower layers."""
        with self._lock:
            if model not in self._base:
                log.info("loading lower model %s from %s", model, self.model_dirs[model])
                folder = self.model_dirs[model]
                decoder = self.model_dims[model].is_decoder
                loaded = decoder_base(load_causal_lm(folder)) if decoder else load_bert(folder)
                self._base[model] = PlotBuilder(loaded, load_tokenizer(folder), self.model_dims[model].vocab)
            return self._base[model]

    def of(self, record: DomainRecord) -> PlotBuilder:
        """The domain's lower model: its base model's, or its domain-adapted layers."""
        base = self.base(record.model)
        if record.lower_model != "adapted":
            return base
        adapted_at = record.adapt.adapted_at
        with self._lock:
            cached = self._adapted.get(record.name)
            if cached is not None and cached[0] == adapted_at:
                return cached[1]
        with self.layout.read() as txn:
            weights = txn.get(record.name.encode(), db=self.layout.db["lower"])
        if weights is None:
            raise FailedPrecondition(f"domain {record.name!r} lost its adapted lower model; adapt it again")
        builder = PlotBuilder(with_lower_layers(base.model, bytes(weights)), base.tokenizer, base.vocab_size)
        with self._lock:
            if len(self._adapted) >= ADAPTED_CACHED:
                self._adapted.pop(next(iter(self._adapted)))
            self._adapted[record.name] = (adapted_at, builder)
        return builder
