"""The store's records of domains and tenants: typed, with explicit JSON conversion for LMDB.

Every record is written with `version` = RECORD_VERSION. A record written before a field existed reads as
if it had the field's default (`_upgrade_v1`: version 1 is every record written before versions were kept),
so old stores keep working. Records also read by key (`record["nodes"]`), as the studies' scripts do.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RECORD_VERSION = 2


class _ByKey:
    """Read access by field name, for scripts that treat a record as a mapping."""

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class AdaptReport(_ByKey):
    """How a domain's lower layers were MLM-adapted (`hmi domain adapt`)."""
    steps: int
    corpus_sequences: int
    base_loss: float
    adapted_loss: float
    seconds: float
    adapted_at: float            # time.time(); the cached adapted lower model is keyed by it


@dataclass
class BridgeReport(_ByKey):
    """The domain bridge a build distilled (models/bridge.py, bridge_distillation.py)."""
    revision: int                # change-log revision of the build that stored it: compute caches by it
    heads: int
    head_dim: int
    ffn: int
    steps: int
    sequences: int
    tokens: int
    loss_before: float           # held-out MSE to the true layer-L states of the plain PLOT rows
    loss_after: float            # ... of the bridged rows
    seconds: float
    cost_in_layers: float        # compute per token in units of one of the model's layers
    bytes: int


@dataclass
class DomainRecord(_ByKey):
    """A domain: its PLOT's spec (split layer, context depth, ...), its tree's size and its learning counters."""
    id: int
    name: str
    split_layer: int
    context: int
    min_count: int
    model: str
    hidden_size: int
    parent: str = ""
    budget_bytes: int = 0            # 0: the store's default budget
    learn_threshold: int = 0         # 0: the store's default, -1: not learning from traffic
    nodes: int = 0
    nodes_per_depth: list[int] = field(default_factory=list)
    rows: int = 0                    # rows allocated (high water); pruning frees rows below it
    plot_bytes: int = 0
    materialized: int = 0            # nodes added from traffic
    pruned: int = 0
    traffic_entries: int = 0         # contexts counted, not (yet) in the tree
    corpus_sequences: int = 0
    corpus_tokens: int = 0
    built_at: float = 0.0            # 0: no PLOT built yet
    generation: int = 1              # bumped by every build: maintenance drops counts of a tree that is gone
    lower_model: str = "base"        # or "adapted": the domain's own lower layers
    position_offsets: bool = False
    revision: int = 0                # change-log revision of the last build or adaptation (0: written before kept)
    adapt: AdaptReport | None = None
    bridge: BridgeReport | None = None   # None: lookups serve plain PLOT rows

    @property
    def row_bytes(self) -> int:
        """Bytes of one fp16 PLOT row."""
        return self.hidden_size * 2

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], default_model: str) -> DomainRecord:
        data = _upgrade(data, default_model)
        data = _upgrade_domain_v1(data) if data.pop("version") < 2 else data
        adapt = data.pop("adapt", None)
        bridge = data.pop("bridge", None)
        return cls(**_known(cls, data), adapt=AdaptReport(**_known(AdaptReport, adapt)) if adapt else None,
                   bridge=BridgeReport(**_known(BridgeReport, bridge)) if bridge else None)


@dataclass
class DomainStatus(DomainRecord):
    """A domain record as answered: with what the store sees live and the defaults in force."""
    recent_hit_depths: list[int] = field(default_factory=list)   # tokens per hit depth, recent lookups
    effective_budget: int = 0
    effective_threshold: int = 0


@dataclass
class TenantRecord(_ByKey):
    """A tenant: its domain (hence base model and split layer), labels and adapter version (the change-log
    revision that wrote it, so unique over the id's whole history)."""
    tenant_id: str
    domain: str
    labels: list[str]
    adapter_version: int
    adapter_bytes: int
    rank: int
    targets: list[str]
    layers: list[int]
    updated_at: float
    split_layer: int
    seed: int = 0
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": RECORD_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], default_model: str) -> TenantRecord:
        data = _upgrade(data, default_model)
        data.pop("version")
        return cls(**_known(cls, data))


def _upgrade(data: dict[str, Any], default_model: str) -> dict[str, Any]:
    """A copy with its version; records from before several models per store belong to the default one."""
    data = dict(data)
    version = data.setdefault("version", 1)
    if version > RECORD_VERSION:
        raise RuntimeError(f"record of version {version} was written by a newer build (this one reads up to "
                           f"{RECORD_VERSION})")
    data["model"] = data.get("model") or default_model
    return data


def _upgrade_domain_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 domain records may lack the fields added over time: they read as their defaults."""
    defaults = {"budget_bytes": 0, "learn_threshold": 0, "materialized": 0, "pruned": 0, "traffic_entries": 0,
                "generation": 1, "lower_model": "base", "parent": "", "position_offsets": False}
    upgraded = {**defaults, **{k: v for k, v in data.items() if v is not None}}
    upgraded.setdefault("rows", data.get("nodes", 0))   # before pruning freed rows, rows = nodes
    return upgraded


def _known(cls, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - {"adapt", "bridge"}
    return {key: value for key, value in data.items() if key in names}
