"""Conversions between the store's JSON records and protobuf messages (shared by store and gateway)."""
from __future__ import annotations

from typing import Any

from hmi_proto.v1 import knowledge_store_pb2 as pb


def domain_to_pb(record: dict[str, Any]) -> pb.Domain:
    return pb.Domain(
        spec=pb.DomainSpec(name=record["name"], parent=record.get("parent", ""),
                           split_layer=record["split_layer"], context=record["context"],
                           min_count=record["min_count"], budget_bytes=record.get("budget_bytes", 0),
                           learn_threshold=record.get("learn_threshold", 0),
                           no_position_offsets=not record.get("position_offsets", False), model=record["model"]),
        model=record["model"], hidden_size=record["hidden_size"], nodes=record["nodes"],
        nodes_per_depth=record["nodes_per_depth"], plot_bytes=record["plot_bytes"],
        corpus_sequences=record["corpus_sequences"], corpus_tokens=record["corpus_tokens"],
        built_at=record["built_at"], lower_model=record.get("lower_model", "base"),
        budget_bytes=record.get("effective_budget", 0), learn_threshold=record.get("effective_threshold", 0),
        materialized_nodes=record.get("materialized", 0), pruned_nodes=record.get("pruned", 0),
        pending_contexts=record.get("traffic_entries", 0), recent_hit_depths=record.get("recent_hit_depths", []),
        adapt=adapt_to_pb(record.get("adapt")), position_offsets=record.get("position_offsets", False))


def adapt_to_pb(adapt: dict[str, Any] | None) -> pb.AdaptReport | None:
    if not adapt:
        return None
    return pb.AdaptReport(steps=adapt["steps"], corpus_sequences=adapt["corpus_sequences"],
                          base_loss=adapt["base_loss"], adapted_loss=adapt["adapted_loss"], seconds=adapt["seconds"])


def tenant_to_pb(record: dict[str, Any]) -> pb.Tenant:
    return pb.Tenant(
        spec=pb.TenantSpec(tenant_id=record["tenant_id"], domain=record["domain"], labels=record["labels"],
                           rank=record["rank"], seed=record.get("seed", 0), model=record.get("model", "")),
        adapter_version=record["adapter_version"], adapter_bytes=record["adapter_bytes"], rank=record["rank"],
        targets=record["targets"], layers=record["layers"], updated_at=record["updated_at"],
        split_layer=record["split_layer"])
