"""Python client of the gateway (public and admin APIs); the CLI, the demo and the tests use it.

Calls that are safe to repeat are retried on UNAVAILABLE (the gateway or a service behind it restarting)
with exponential backoff, within the call's timeout: reads, classification and embedding, and every write,
because each write carries a request id generated once per call, so a retry after a lost answer returns
the first result instead of applying the write twice. Generation streams are not retried.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hmi_proto.v1 import gateway_pb2 as pb
from hmi_proto.v1 import gateway_pb2_grpc as pb_grpc
from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from services.common.codec import split_chunks
from services.common.rpc import channel
from services.knowledge_store.client import lookup_request, read_lookup_stream

T = TypeVar("T")
RETRY_BACKOFF = (0.1, 0.2, 0.4, 0.8, 1.6)    # seconds before each further attempt


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]


class HMIClient:
    def __init__(self, address: str, timeout: float = 30.0, retries: int = 4) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries                # further attempts after UNAVAILABLE (0: none)
        self.channel = channel(address)
        self.gateway = pb_grpc.GatewayStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "HMIClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _retrying(self, call: Callable[[float], T], timeout: float | None = None) -> T:
        """Runs `call(remaining_timeout)`, again after UNAVAILABLE with backoff, never past the timeout."""
        deadline = time.monotonic() + (timeout or self.timeout)
        for attempt in range(self.retries + 1):
            try:
                return call(max(0.01, deadline - time.monotonic()))
            except grpc.RpcError as error:
                pause = RETRY_BACKOFF[min(attempt, len(RETRY_BACKOFF) - 1)]
                if (not hasattr(error, "code") or error.code() != grpc.StatusCode.UNAVAILABLE
                        or attempt == self.retries or time.monotonic() + pause >= deadline):
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")

    # ---- admin ---------------------------------------------------------------------------------

    def build_domain(self, name: str, corpus: str, *, split_layer: int, context: int, min_count: int,
                     parent: str = "", budget_bytes: int = 0, learn_threshold: int = 0,
                     position_offsets: bool = True,
                     progress: Callable[[store_pb.BuildDomainProgress], None] | None = None,
                     timeout: float | None = None, model: str = "", request_id: str = "") -> store_pb.Domain:
        spec = store_pb.DomainSpec(name=name, parent=parent, split_layer=split_layer, context=context,
                                   min_count=min_count, budget_bytes=budget_bytes, learn_threshold=learn_threshold,
                                   no_position_offsets=not position_offsets, model=model,
                                   request_id=request_id or new_request_id())

        def requests() -> Iterator[store_pb.BuildDomainRequest]:
            yield store_pb.BuildDomainRequest(spec=spec)
            for chunk in split_chunks(corpus.encode("utf-8")):
                yield store_pb.BuildDomainRequest(corpus_chunk=chunk)

        return self._retrying(lambda left: _final_domain(self.admin.BuildDomain(requests(), timeout=left), progress),
                              timeout or 3600)

    def adapt_domain(self, name: str, corpus: str, *, split_layer: int, parent: str = "", steps: int = 0,
                     batch_size: int = 0, learning_rate: float = 0.0, seed: int = 0,
                     progress: Callable[[store_pb.BuildDomainProgress], None] | None = None,
                     timeout: float | None = None, request_id: str = "") -> store_pb.Domain:
        request_id = request_id or new_request_id()

        def requests() -> Iterator[store_pb.AdaptDomainRequest]:
            yield store_pb.AdaptDomainRequest(spec=store_pb.DomainSpec(name=name, parent=parent,
                                                                       split_layer=split_layer,
                                                                       request_id=request_id))
            yield store_pb.AdaptDomainRequest(settings=store_pb.AdaptSettings(
                steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed))
            for chunk in split_chunks(corpus.encode("utf-8")):
                yield store_pb.AdaptDomainRequest(corpus_chunk=chunk)

        return self._retrying(lambda left: _final_domain(self.admin.AdaptDomain(requests(), timeout=left), progress),
                              timeout or 3600)

    def get_domain(self, name: str) -> store_pb.Domain:
        return self._retrying(lambda left: self.admin.GetDomain(store_pb.GetDomainRequest(name=name), timeout=left))

    def list_domains(self) -> list[store_pb.Domain]:
        return list(self._retrying(lambda left: self.admin.ListDomains(store_pb.ListDomainsRequest(),
                                                                       timeout=left)).domains)

    def delete_domain(self, name: str, request_id: str = "") -> None:
        request = store_pb.DeleteDomainRequest(name=name, request_id=request_id or new_request_id())
        self._retrying(lambda left: self.admin.DeleteDomain(request, timeout=left))

    def register_tenant(self, tenant_id: str, domain: str, labels: list[str], adapter: bytes | None = None,
                        *, rank: int = 0, seed: int = 0, model: str = "", request_id: str = "") -> store_pb.Tenant:
        """Registers or replaces the tenant. `adapter` None: a random adapter; bytes (even empty, which the store
        refuses) are the adapter file. Retried on UNAVAILABLE under one request id: applied once."""
        spec = store_pb.TenantSpec(tenant_id=tenant_id, domain=domain, labels=labels, rank=rank, seed=seed,
                                   model=model, request_id=request_id or new_request_id(),
                                   has_adapter=adapter is not None)

        def requests() -> Iterator[store_pb.PutTenantRequest]:
            yield store_pb.PutTenantRequest(spec=spec)
            for chunk in split_chunks(adapter or b""):
                yield store_pb.PutTenantRequest(adapter_chunk=chunk)

        return self._retrying(lambda left: self.admin.RegisterTenant(requests(), timeout=left))

    def get_tenant(self, tenant_id: str) -> store_pb.Tenant:
        return self._retrying(lambda left: self.admin.GetTenant(store_pb.GetTenantRequest(tenant_id=tenant_id),
                                                                timeout=left))

    def list_tenants(self, domain: str = "", limit: int = 0, after: str = "") -> store_pb.ListTenantsResponse:
        request = store_pb.ListTenantsRequest(domain=domain, limit=limit, after=after)
        return self._retrying(lambda left: self.admin.ListTenants(request, timeout=left))

    def backup(self, path: str, timeout: float | None = None) -> store_pb.BackupResponse:
        """A consistent copy of the running store into `path`, a new folder on the store's machine."""
        return self._retrying(lambda left: self.admin.Backup(store_pb.BackupRequest(path=path), timeout=left),
                              timeout or 3600)

    def lookup(self, domain: str, sequences: list[np.ndarray]) -> list[np.ndarray]:
        """PLOT vectors (fp16 [len, hidden]) of each token-id sequence, as compute would receive them."""
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
        request = lookup_request(domain, np.concatenate(sequences), offsets)
        reply = self._retrying(lambda left: read_lookup_stream(self.admin.Lookup(request, timeout=left)))
        return [reply.vectors[offsets[i]:offsets[i + 1]] for i in range(len(sequences))]

    def delete_tenant(self, tenant_id: str, request_id: str = "") -> None:
        request = store_pb.DeleteTenantRequest(tenant_id=tenant_id, request_id=request_id or new_request_id())
        self._retrying(lambda left: self.admin.DeleteTenant(request, timeout=left))

    # ---- public --------------------------------------------------------------------------------

    def classify(self, tenant_id: str, texts: list[str], timeout: float | None = None,
                 truncate: bool = False) -> list[Prediction]:
        request = pb.ClassifyRequest(tenant_id=tenant_id, texts=texts, truncate=truncate)
        response = self._retrying(lambda left: self.gateway.Classify(request, timeout=left), timeout)
        return [Prediction(r.label, dict(zip(r.labels, r.probabilities))) for r in response.results]

    def classify_future(self, tenant_id: str, texts: list[str], timeout: float | None = None):
        return self.gateway.Classify.future(pb.ClassifyRequest(tenant_id=tenant_id, texts=texts),
                                            timeout=timeout or self.timeout)

    def embed(self, tenant_id: str, texts: list[str], timeout: float | None = None,
              truncate: bool = False) -> list[list[float]]:
        request = pb.EmbedRequest(tenant_id=tenant_id, texts=texts, truncate=truncate)
        response = self._retrying(lambda left: self.gateway.Embed(request, timeout=left), timeout)
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
