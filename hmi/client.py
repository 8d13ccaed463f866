"""Python client of the gateway (public and admin APIs); the CLI, the demo and the tests use it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hmi_proto.v1 import gateway_pb2 as pb
from hmi_proto.v1 import gateway_pb2_grpc as pb_grpc
from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from services.common.codec import split_chunks
from services.common.rpc import channel
from services.knowledge_store.client import lookup_request, read_lookup_stream


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]


class HMIClient:
    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = channel(address)
        self.gateway = pb_grpc.GatewayStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "HMIClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- admin ---------------------------------------------------------------------------------

    def build_domain(self, name: str, corpus: str, *, split_layer: int, context: int, min_count: int,
                     parent: str = "", budget_bytes: int = 0, learn_threshold: int = 0,
                     position_offsets: bool = True,
                     progress: Callable[[store_pb.BuildDomainProgress], None] | None = None,
                     timeout: float | None = None, model: str = "") -> store_pb.Domain:
        spec = store_pb.DomainSpec(name=name, parent=parent, split_layer=split_layer, context=context,
                                   min_count=min_count, budget_bytes=budget_bytes, learn_threshold=learn_threshold,
                                   no_position_offsets=not position_offsets, model=model)

        def requests() -> Iterator[store_pb.BuildDomainRequest]:
            yield store_pb.BuildDomainRequest(spec=spec)
            for chunk in split_chunks(corpus.encode("utf-8")):
                yield store_pb.BuildDomainRequest(corpus_chunk=chunk)

        return _final_domain(self.admin.BuildDomain(requests(), timeout=timeout or 3600), progress)

    def adapt_domain(self, name: str, corpus: str, *, split_layer: int, parent: str = "", steps: int = 0,
                     batch_size: int = 0, learning_rate: float = 0.0, seed: int = 0,
                     progress: Callable[[store_pb.BuildDomainProgress], None] | None = None,
                     timeout: float | None = None) -> store_pb.Domain:
        def requests() -> Iterator[store_pb.AdaptDomainRequest]:
            yield store_pb.AdaptDomainRequest(spec=store_pb.DomainSpec(name=name, parent=parent,
                                                                       split_layer=split_layer))
            yield store_pb.AdaptDomainRequest(settings=store_pb.AdaptSettings(
                steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed))
            for chunk in split_chunks(corpus.encode("utf-8")):
                yield store_pb.AdaptDomainRequest(corpus_chunk=chunk)

        return _final_domain(self.admin.AdaptDomain(requests(), timeout=timeout or 3600), progress)

    def get_domain(self, name: str) -> store_pb.Domain:
        return self.admin.GetDomain(store_pb.GetDomainRequest(name=name), timeout=self.timeout)

    def list_domains(self) -> list[store_pb.Domain]:
        return list(self.admin.ListDomains(store_pb.ListDomainsRequest(), timeout=self.timeout).domains)

    def delete_domain(self, name: str) -> None:
        self.admin.DeleteDomain(store_pb.DeleteDomainRequest(name=name), timeout=self.timeout)

    def register_tenant(self, tenant_id: str, domain: str, labels: list[str], adapter: bytes | None = None,
                        *, rank: int = 0, seed: int = 0, model: str = "") -> store_pb.Tenant:
        def requests() -> Iterator[store_pb.PutTenantRequest]:
            yield store_pb.PutTenantRequest(spec=store_pb.TenantSpec(
                tenant_id=tenant_id, domain=domain, labels=labels, rank=rank, seed=seed, model=model))
            for chunk in split_chunks(adapter or b""):
                yield store_pb.PutTenantRequest(adapter_chunk=chunk)

        return self.admin.RegisterTenant(requests(), timeout=self.timeout)

    def get_tenant(self, tenant_id: str) -> store_pb.Tenant:
        return self.admin.GetTenant(store_pb.GetTenantRequest(tenant_id=tenant_id), timeout=self.timeout)

    def list_tenants(self, domain: str = "", limit: int = 0, after: str = "") -> store_pb.ListTenantsResponse:
        return self.admin.ListTenants(store_pb.ListTenantsRequest(domain=domain, limit=limit, after=after),
                                      timeout=self.timeout)

    def lookup(self, domain: str, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """PLOT vectors (fp16 [len, hidden]) of each token-id sequence, as compute would receive them."""
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
        request = lookup_request(domain, np.concatenate(sequences), offsets)
        reply = read_lookup_stream(self.admin.Lookup(request, timeout=self.timeout))
        return [reply.vectors[offsets[i]:offsets[i + 1]] for i in range(len(sequences))]

    def delete_tenant(self, tenant_id: str) -> None:
        self.admin.DeleteTenant(store_pb.DeleteTenantRequest(tenant_id=tenant_id), timeout=self.timeout)

    # ---- public --------------------------------------------------------------------------------

    def classify(self, tenant_id: str, texts: list[str], timeout: float | None = None,
                 truncate: bool = False) -> list[Prediction]:
        response = self.gateway.Classify(pb.ClassifyRequest(tenant_id=tenant_id, texts=texts, truncate=truncate),
                                         timeout=timeout or self.timeout)
        return [Prediction(r.label, dict(zip(r.labels, r.probabilities))) for r in response.results]

    def classify_future(self, tenant_id: str, texts: list[str], timeout: float | None = None):
        return self.gateway.Classify.future(pb.ClassifyRequest(tenant_id=tenant_id, texts=texts),
                                            timeout=timeout or self.timeout)

    def embed(self, tenant_id: str, texts: list[str], timeout: float | None = None,
              truncate: bool = False) -> list[list[float]]:
        response = self.gateway.Embed(pb.EmbedRequest(tenant_id=tenant_id, texts=texts, truncate=truncate),
                                      timeout=timeout or self.timeout)
        return [list(e.values) for e in response.embeddings]

    def generate(self, tenant_id: str, prompt: str, *, max_new_tokens: int = 0, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: list[str] | None = None,
                 timeout: float | None = None):
        """The response stream: iterate for text pieces as they are generated; `.cancel()` stops it."""
        request = pb.GenerateTextRequest(tenant_id=tenant_id, prompt=prompt, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, stop=stop or [])
        if seed is not None:
            request.seed = seed
        return self.gateway.Generate(request, timeout=timeout or self.timeout)


def is_serving(address: str, timeout: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _final_domain(updates, progress) -> store_pb.Domain:
    """Follows a build/adapt progress stream to its final domain record."""
    domain = None
    for update in updates:
        if progress is not None:
            progress(update)
        if update.stage == "done":
            domain = update.domain
    if domain is None:
        raise RuntimeError("the job ended without a result")
    return domain
