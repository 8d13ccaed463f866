"""HMIClient: the Gateway (classify, embed, generate), Admin (domains, tenants) and FineTuning (fine_tuning.py)
services in one object.

Plain grpcio and protobuf: every call takes the client's timeout unless given one, and every failure is
raised as a typed exception (hmi_client.errors).

Calls that are safe to repeat are retried on UNAVAILABLE (the gateway or a service behind it restarting)
with exponential backoff, within the call's timeout: reads, classification and embedding, and every write,
because each write carries a request id generated once per call, so a retry after a lost answer returns
the first result instead of applying the write twice. Generation streams are not retried.

Credentials: `token` (else the environment variable HMI_TOKEN) travels as `authorization: Bearer <token>` on
every call: an API key (`hmi key create`) or the admin token. `tls_ca` (else HMI_TLS_CA) is the PEM file of the
CA that signed the gateway's certificate: the channel then uses TLS (`tls=True` trusts the system's CAs)."""
from __future__ import annotations

import collections
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import grpc

from hmi_client.errors import translated
from hmi_client.fine_tuning import FineTuningCalls
from hmi_client.v1 import catalog_pb2 as catalog
from hmi_client.v1 import fine_tuning_pb2_grpc as ft_grpc
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


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __repr__(self) -> str:
        return "_Bearer(<hidden>)"

    def _details(self, details):
        return _Details(details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
                        details.credentials, getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def open_channel(address: str, *, tls_ca: str | None = None, tls: bool = False, tls_cert: str | None = None,
                 tls_key: str | None = None, options=CHANNEL_OPTIONS) -> grpc.Channel:
    """A channel to an HMI service: TLS when `tls_ca` (a PEM file) or `tls` (the system's CAs) is given, with a
    client certificate when `tls_cert` and `tls_key` are (the internal services' mutual TLS)."""
    if tls_ca or tls:
        def read(path):
            with open(path, "rb") as file:
                return file.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(tls_ca) if tls_ca else None,
            private_key=read(tls_key) if tls_key and tls_cert else None,
            certificate_chain=read(tls_cert) if tls_key and tls_cert else None)
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


class HMIClient(FineTuningCalls):
    def __init__(self, address: str, timeout: float = 30.0, retries: int = 4, *,
                 channel: grpc.Channel | None = None, token: str | None = None, tls_ca: str | None = None,
                 tls: bool = False) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries                # further attempts after UNAVAILABLE (0: none)
        token = token if token is not None else os.environ.get("HMI_TOKEN") or None
        tls_ca = tls_ca if tls_ca is not None else os.environ.get("HMI_TLS_CA") or None
        self._raw_channel = channel or open_channel(address, tls_ca=tls_ca, tls=tls)
        self.channel = grpc.intercept_channel(self._raw_channel, _Bearer(token)) if token else self._raw_channel
        self.gateway = pb_grpc.GatewayStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self.tuning = ft_grpc.FineTuningStub(self.channel)

    def close(self) -> None:
        self._raw_channel.close()

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

    # ---- API keys and tenant limits (the admin's; a key may read its tenants' limits) ------------

    def create_key(self, tenants: list[str], *, tenant_admin: bool = False, domains: list[str] | None = None,
                   expires_in_days: float = 0.0, description: str = "", rps: float = 0.0, tps: float = 0.0,
                   max_concurrent: int = 0) -> catalog.CreateKeyResponse:
        """A new API key for `tenants` (ids, or prefixes such as 'acme-*'); `.secret` is the key, shown only
        here. `rps`, `tps`, `max_concurrent`: the key's own limits, beside its tenants' (0 = none). Not retried: a
        retry after a lost answer would make a second key."""
        request = catalog.CreateKeyRequest(tenants=tenants, tenant_admin=tenant_admin, domains=domains or [],
                                           expires_in_seconds=expires_in_days * 86400.0, description=description,
                                           rps=rps, tps=tps, max_concurrent=max_concurrent)
        with translated():
            return self.admin.CreateKey(request, timeout=self.timeout)

    def list_keys(self) -> list[catalog.ApiKey]:
        with translated():
            return list(self._retrying(lambda left: self.admin.ListKeys(catalog.ListKeysRequest(),
                                                                        timeout=left)).keys)

    def revoke_key(self, key_id: str) -> catalog.ApiKey:
        request = catalog.RevokeKeyRequest(id=key_id)
        with translated():
            return self._retrying(lambda left: self.admin.RevokeKey(request, timeout=left))

    def set_tenant_limits(self, tenant_id: str, *, rps: float = 0.0, tps: float = 0.0, max_concurrent: int = 0,
                          max_queued: int = 0, priority: int = 0) -> catalog.TenantLimits:
        """Replaces the tenant's limits (0 = none; priority 0 = 1)."""
        request = catalog.SetTenantLimitsRequest(limits=catalog.TenantLimits(
            tenant_id=tenant_id, rps=rps, tps=tps, max_concurrent=max_concurrent, max_queued=max_queued,
            priority=priority))
        with translated():
            return self._retrying(lambda left: self.admin.SetTenantLimits(request, timeout=left))

    def get_tenant_limits(self, tenant_id: str) -> catalog.TenantLimits:
        request = catalog.GetTenantLimitsRequest(tenant_id=tenant_id)
        with translated():
            return self._retrying(lambda left: self.admin.GetTenantLimits(request, timeout=left))

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

    def tokenize(self, tenant_id: str, texts: list[str], *, special_tokens: bool = True,
                 timeout: float | None = None) -> pb.TokenizeResponse:
        """The texts' tokens as the tenant's base model reads them (`.texts[i].ids`, `.pieces`, `.starts`,
        `.ends`, `.special`) and `.max_model_len`."""
        request = pb.TokenizeRequest(tenant_id=tenant_id, texts=texts, no_special_tokens=not special_tokens)
        with translated():
            return self._retrying(lambda left: self.gateway.Tokenize(request, timeout=left), timeout)

    def detokenize(self, tenant_id: str, sequences: list[list[int]], *, keep_special_tokens: bool = False,
                   timeout: float | None = None) -> list[str]:
        """The text of each sequence of the base model's token ids."""
        request = pb.DetokenizeRequest(tenant_id=tenant_id, sequences=[pb.TokenIds(ids=ids) for ids in sequences],
                                       keep_special_tokens=keep_special_tokens)
        with translated():
            return list(self._retrying(lambda left: self.gateway.Detokenize(request, timeout=left), timeout).texts)

    def generate(self, tenant_id: str, prompt: str = "", *, max_new_tokens: int = 0, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 0.0, seed: int | None = None, stop: list[str] | None = None,
                 prompt_ids: list[int] | None = None, ignore_eos: bool = False, truncate_prompt_tokens: int = 0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                 json_schema: dict | str | None = None, json_object: bool = False, regex: str | None = None,
                 choices: list[str] | None = None, session_id: str = "", kv_budget: int = 0,
                 timeout: float | None = None) -> GenerationStream:
        """Iterate for text pieces as they are generated; `.cancel()` stops it, `.collect()` waits for all.
        `prompt_ids`: token ids of the base model's tokenizer instead of `prompt`; `ignore_eos`: generate
        `max_new_tokens` past end-of-text; `truncate_prompt_tokens`: keep only the prompt's last so many tokens;
        the penalties as OpenAI's (presence, frequency: [-2, 2]) and transformers' (repetition: (0, 2]).
        Structured output, at most one of: `json_schema` (the text is JSON that follows it), `json_object` (any
        JSON object), `regex` (the text matches it), `choices` (the text is one of them). `session_id`: the
        conversation this continues (its turns go to the compute replica that keeps their KV); `kv_budget`:
        keep only so many tokens' KV per layer and head once decoding (0: all)."""
        request = pb.GenerateTextRequest(tenant_id=tenant_id, prompt=prompt, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p, stop=stop or [],
                                         prompt_ids=prompt_ids or [], ignore_eos=ignore_eos,
                                         truncate_prompt_tokens=truncate_prompt_tokens,
                                         presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                         repetition_penalty=repetition_penalty, session_id=session_id,
                                         kv_budget=kv_budget)
        if seed is not None:
            request.seed = seed
        if sum((json_schema is not None, json_object, regex is not None, choices is not None)) > 1:
            raise ValueError("give at most one of json_schema, json_object, regex and choices")
        if choices is not None and not choices:
            raise ValueError("choices is empty: give at least one string")
        if json_schema is not None:
            request.output_format.json_schema = (json_schema if isinstance(json_schema, str)
                                                  else json.dumps(json_schema))
        elif json_object:
            request.output_format.json_object = True
        elif regex is not None:
            request.output_format.regex = regex
        elif choices is not None:
            request.output_format.choice.options.extend(choices)
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
