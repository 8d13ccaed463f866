"""HMIClient: the Gateway (classify, embed, generate) and Admin (domains, tenants) services in one object.

Plain grpcio and protobuf: every call takes the client's timeout unless given one, and every failure is
raised as a typed exception (hmi_client.errors).

Calls that are safe to repeat are retried on UNAVAILABLE (the gateway or a service behind it restarting)
with exponential backoff, within the call's timeout: reads, classification and embedding, and every write,
because each write carries a request id generated once per call, so a retry after a lost answer returns
the first result instead of applying the write twice. Generation streams are not retried."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import grpc

from hmi_client.errors import translated
from hmi_client.v1 import catalog_pb2 as catalog
from hmi_client.v1 import gateway_pb2 as pb
from hmi_client.v1 import gateway_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 << 20     # as the services: large payloads stream in chunks anyway
CHUNK_BYTES = 1 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
RETRY_BACKOFF = (0.1, 0.2, 0.4, 0.8, 1.6)    # seconds before each further attempt
T = TypeVar("T")


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]


@dataclass
class Generation:
    """A whole generated text (GenerationStream.collect)."""
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


class GenerationStream:
    """Text pieces (GenerateTextResponse: text, token_ids, finish_reason, prompt_tokens) as they are
    generated. `cancel()` stops the generation on the server; errors arrive as typed exceptions."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> "GenerationStream":
        return self

    def __next__(self) -> pb.GenerateTextResponse:
        with translated():
            return next(self._call)

    def cancel(self) -> None:
        self._call.cancel()

    def collect(self) -> Generation:
        result = Generation("", [], "", 0)
        for message in self:
            result.text += message.text
            result.token_ids.extend(message.token_ids)
            result.finish_reason = message.finish_reason or result.finish_reason
            result.prompt_tokens = message.prompt_tokens or result.prompt_tokens
        return result


def split_chunks(data: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


class HMIClient:
    def __init__(self, address: str, timeout: float = 30.0, retries: int = 4, *,
                 channel: grpc.Channel | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries                # further attempts after UNAVAILABLE (0: none)
        self.channel = channel or grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
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

    def build_domain(self, name: str, corpus: str, *, split_layer: int = -1, context: int = 0, min_count: int = 2,
                     parent: str = "", budget_bytes: int = 0, learn_threshold: int = 0,
                     position_offsets: bool = True,
                     progress: Callable[[catalog.BuildDomainProgress], None] | None = None,
                     timeout: float | None = None, model: str = "", request_id: str = "",
                     bridge: bool = True, bridge_steps: int = 0) -> catalog.Domain:
        """Builds or rebuilds a domain's PLOT from a corpus (one sequence per line); split_layer -1 and context 0
        = the model's defaults (a rebuild keeps the domain's).

        `bridge` False: no domain bridge (encoder domains get one by default); `bridge_steps` 0 = automatic."""
        spec = catalog.DomainSpec(name=name, parent=parent, split_layer=split_layer, context=context,
                                  min_count=min_count, budget_bytes=budget_bytes, learn_threshold=learn_threshold,
                                  no_position_offsets=not position_offsets, model=model,
                                  request_id=request_id or new_request_id(), no_bridge=not bridge)
        if bridge and bridge_steps:
            spec.bridge.steps = bridge_steps

        def requests() -> Iterator[catalog.BuildDomainRequest]:
            yield catalog.BuildDomainRequest(spec=spec)
            for chunk in split_chunks(corpus.encode("utf-8")):
                yield catalog.BuildDomainRequest(corpus_chunk=chunk)

        with translated():
            return self._retrying(lambda left: _final_domain(self.admin.BuildDomain(requests(), timeout=left),
                                                             progress), timeout or 3600)

    def adapt_domain(self, name: str, corpus: str, *, split_layer: int, parent: str = "", steps: int = 0,
                     batch_size: int = 0, learning_rate: float = 0.0, seed: int = 0,
                     progress: Callable[[catalog.BuildDomainProgress], None] | None = None,
                     timeout: float | None = None, request_id: str = "") -> catalog.Domain:
        request_id = request_id or new_request_id()

        def requests() -> Iterator[catalog.AdaptDomainRequest]:
            yield catalog.AdaptDomainRequest(spec=catalog.DomainSpec(name=name, parent=parent,
                                                                     split_layer=split_layer,
                                                                     request_id=request_id))
            yield catalog.AdaptDomainRequest(settings=catalog.AdaptSettings(
                steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed))
            for chunk in split_chunks(corpus.encode("utf-8")):
                yield catalog.AdaptDomainRequest(corpus_chunk=chunk)

        with translated():
            return self._retrying(lambda left: _final_domain(self.admin.AdaptDomain(requests(), timeout=left),
                                                             progress), timeout or 3600)

    def get_domain(self, name: str) -> catalog.Domain:
        request = catalog.GetDomainRequest(name=name)
        with translated():
            return self._retrying(lambda left: self.admin.GetDomain(request, timeout=left))

    def list_domains(self) -> list[catalog.Domain]:
        with translated():
            return list(self._retrying(lambda left: self.admin.ListDomains(catalog.ListDomainsRequest(),
                                                                           timeout=left)).domains)

    def delete_domain(self, name: str, request_id: str = "") -> None:
        request = catalog.DeleteDomainRequest(name=name, request_id=request_id or new_request_id())
        with translated():
            self._retrying(lambda left: self.admin.DeleteDomain(request, timeout=left))

    def register_tenant(self, tenant_id: str, domain: str, labels: list[str] | None = None,
                        adapter: bytes | None = None, *, rank: int = 0, seed: int = 0,
                        model: str = "", request_id: str = "") -> catalog.Tenant:
        """Registers or replaces a tenant: a classifier (labels), an embedder (an encoder's tenant without
        labels) or a generator (a decoder's). `adapter`: HMI's safetensors bytes (even empty ones, which the
        store refuses); None = a random adapter. Retried on UNAVAILABLE under one request id: applied once."""
        spec = catalog.TenantSpec(tenant_id=tenant_id, domain=domain, labels=labels or [], rank=rank, seed=seed,
                                  model=model, request_id=request_id or new_request_id(),
                                  has_adapter=adapter is not None)

        def requests() -> Iterator[catalog.PutTenantRequest]:
            yield catalog.PutTenantRequest(spec=spec)
            for chunk in split_chunks(adapter or b""):
                yield catalog.PutTenantRequest(adapter_chunk=chunk)

        with translated():
            return self._retrying(lambda left: self.admin.RegisterTenant(requests(), timeout=left))

    def get_tenant(self, tenant_id: str) -> catalog.Tenant:
        request = catalog.GetTenantRequest(tenant_id=tenant_id)
        with translated():
            return self._retrying(lambda left: self.admin.GetTenant(request, timeout=left))

    def list_tenants(self, domain: str = "", limit: int = 0, after: str = "") -> catalog.ListTenantsResponse:
        request = catalog.ListTenantsRequest(domain=domain, limit=limit, after=after)
        with translated():
            return self._retrying(lambda left: self.admin.ListTenants(request, timeout=left))

    def get_adapter(self, tenant_id: str, version: int = 0) -> bytes:
        """The tenant's adapter file (HMI's safetensors format); version 0 = the current one."""
        request = catalog.GetAdapterRequest(tenant_id=tenant_id, version=version)
        with translated():
            return self._retrying(lambda left: b"".join(chunk.data for chunk in
                                                        self.admin.GetAdapter(request, timeout=left)))

    def delete_tenant(self, tenant_id: str, request_id: str = "") -> None:
        request = catalog.DeleteTenantRequest(tenant_id=tenant_id, request_id=request_id or new_request_id())
        with translated():
            self._retrying(lambda left: self.admin.DeleteTenant(request, timeout=left))

    def backup(self, path: str, timeout: float | None = None) -> catalog.BackupResponse:
        """A consistent copy of the running store into `path`, a new folder on the store's machine."""
        request = catalog.BackupRequest(path=path)
        with translated():
            return self._retrying(lambda left: self.admin.Backup(request, timeout=left), timeout or 3600)

    # ---- public --------------------------------------------------------------------------------

    def classify(self, tenant_id: str, texts: list[str], timeout: float | None = None,
                 truncate: bool = False) -> list[Prediction]:
        request = pb.ClassifyRequest(tenant_id=tenant_id, texts=texts, truncate=truncate)
        with translated():
            response = self._retrying(lambda left: self.gateway.Classify(request, timeout=left), timeout)
        return [Prediction(r.label, dict(zip(r.labels, r.probabilities))) for r in response.results]

    def classify_future(self, tenant_id: str, texts: list[str], timeout: float | None = None):
        """The raw gRPC future of a Classify call (its result() raises grpc.RpcError)."""
        return self.gateway.Classify.future(pb.ClassifyRequest(tenant_id=tenant_id, texts=texts),
                                            timeout=timeout or self.timeout)

    def embed(self, tenant_id: str, texts: list[str], timeout: float | None = None,
              truncate: bool = False) -> list[list[float]]:
        request = pb.EmbedRequest(tenant_id=tenant_id, texts=texts, truncate=truncate)
        with translated():
            response = self._retrying(lambda left: self.gateway.Embed(request, timeout=left), timeout)
        return [list(e.values) for e in response.embeddings]

    def generate(self, tenant_id: str, prompt: str, *, max_new_tokens: int = 0, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: list[str] | None = None,
                 timeout: float | None = None) -> GenerationStream:
        """Iterate for text pieces as they are generated; `.cancel()` stops it, `.collect()` waits for all."""
        request = pb.GenerateTextRequest(tenant_id=tenant_id, prompt=prompt, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, stop=stop or [])
        if seed is not None:
            request.seed = seed
        return GenerationStream(self.gateway.Generate(request, timeout=timeout or self.timeout))


def _final_domain(updates, progress) -> catalog.Domain:
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
