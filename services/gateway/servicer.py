"""Public (Classify, Embed, Generate) and admin (domains, tenants, keys, limits) gRPC surfaces of the gateway.

Every method first asks `access` who the caller is and checks the tenant or action against its scope
(services/gateway/access.py), then the tenant's quotas (quotas.py), before any work is queued."""
from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import grpc
import numpy as np

from hmi_proto.v1 import gateway_pb2 as pb
from hmi_proto.v1 import gateway_pb2_grpc as pb_grpc
from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as store_grpc
from services.common import tracing
from services.common.decoding import UndecodableRequest
from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from services.common.rpc import handles_errors, handles_stream_errors, remaining_timeout
from services.compute.client import Sequence, generate_request, replica_unreachable
from services.gateway import metrics
from services.gateway.access import REFUSED, Access, Principal
from services.gateway.batcher import Batcher, SequenceFailed, SequenceResult, SequenceWork
from services.gateway.directory import TenantDirectory, TenantRoute
from services.gateway.generation import GenerationLimits, TextStreamer, plan_generation
from services.gateway.quotas import Permit, Quotas
from services.gateway.router import Replica, Router
from services.gateway.tokenizer import TextEncoder

ADMIN_TIMEOUT = 60.0
BUILD_TIMEOUT = 6 * 3600.0


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


@dataclass
class ModelLane:
    """What the gateway holds for one base model: its tokenizer and limits, and its replicas' batcher."""
    name: str
    encoder: TextEncoder
    batcher: Batcher
    router: Router
    generation: GenerationSupport | None = None   # decoders only


@dataclass
class GenerationSupport:
    """What Generate needs besides the tenant directory: the decoder's tokenizer and limits, and the replicas."""
    tokenizer: object
    limits: GenerationLimits
    max_positions: int
    eos_token_ids: tuple[int, ...]
    router: Router
    timeout: float = 600.0              # a stream's deadline when the caller gave none


def answer_margin(timeout: float) -> float:
    """How long before the caller's deadline the gateway gives up waiting, so that its own answer (which says
    why: no replica reachable) arrives before the caller's deadline does."""
    return min(0.1, 0.05 * timeout)


def no_replica(lane_name: str, router: Router, waited: float) -> Unavailable:
    return Unavailable(f"no compute replica of model {lane_name!r} is reachable ({router.describe()}); waited "
                       f"{waited:.1f}s within the request's deadline: retry with backoff")


def open_access() -> Access:
    """`--auth off`: every caller is the admin."""
    return Access(enabled=False, admin_token=None, keys=None)


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, lanes: dict[str, ModelLane], directory: TenantDirectory, default_timeout: float = 30.0,
                 access: Access | None = None, quotas: Quotas | None = None) -> None:
        self.lanes = lanes
        self.default_model = next(iter(lanes))
        self.directory = directory
        self.default_timeout = default_timeout      # for calls without a deadline (Generate: its lane's own)
        self.access = access or open_access()
        self.quotas = quotas or Quotas()

    def authorized_route(self, tenant_id: str, context, what: str) -> TenantRoute:
        """The tenant's route, for a caller allowed to use it (what the HTTP door's chat route resolves)."""
        principal = self.access.principal(context.invocation_metadata())     # who, before anything else
        if not tenant_id:
            raise InvalidArgument("tenant_id is required")
        principal.require_tenant(tenant_id, what)
        return self.directory.resolve(tenant_id, remaining_timeout(context, self.default_timeout))

    def _lane(self, route: TenantRoute) -> ModelLane:
        lane = self.lanes.get(route.model or self.default_model)
        if lane is None:
            raise FailedPrecondition(f"tenant {route.tenant_id!r} belongs to base model {route.model!r}, which this "
                                     f"gateway does not serve (models: {', '.join(self.lanes)}); start it with "
                                     f"--model {route.model}=DIR and --compute {route.model}=ADDRESS")
        return lane

    def _run(self, request, context, want_embedding: bool,
             observed: dict | None = None) -> tuple[list[SequenceResult], tuple[str, ...], int]:
        """Results per text, the tenant's labels and the tokens the texts came to.

        Resolves the tenant, queues its sequences and waits for them. Labels and adapter always come from one
        resolved version: when compute finds that version gone (the tenant was replaced or deleted, or its domain
        rebuilt, since this gateway resolved it), the tenant is resolved again and the request runs once more."""
        timeout = remaining_timeout(context, self.default_timeout)
        started = time.monotonic()
        route = self.authorized_route(request.tenant_id, context, "Embed" if want_embedding else "Classify")
        permit = self.quotas.admit(request.tenant_id, route.limits)     # before any work
        try:
            return self._run_admitted(request, context, want_embedding, started, timeout, route, permit, observed)
        finally:
            permit.release()

    def _run_admitted(self, request, context, want_embedding: bool, started: float, timeout: float,
                      route: TenantRoute, permit: Permit,
                      observed: dict | None) -> tuple[list[SequenceResult], tuple[str, ...], int]:
        deadline = started + timeout
        work: list[SequenceWork] = []
        context.add_callback(lambda: [item.abandon() for item in work])   # the caller went away
        encoded: tuple[str, list] | None = None
        for attempt in range(2):
            if attempt:
                route = self.directory.resolve(request.tenant_id, max(0.05, deadline - time.monotonic()))
            lane = self._lane(route)
            if lane.generation is not None:
                raise FailedPrecondition(f"tenant {request.tenant_id!r} generates text (its base model is a "
                                         f"decoder): call Generate")
            if not route.labels and not want_embedding:
                raise FailedPrecondition(f"tenant {request.tenant_id!r} is embedding-only (registered without "
                                         f"labels, its adapter has no classification head): call Embed, or register "
                                         f"it again with --labels and a head to classify")
            if observed is not None:
                observed["model"] = lane.name
            if encoded is None or encoded[0] != lane.name:
                encoded = (lane.name, lane.encoder.encode(list(request.texts), request.truncate))
                metrics.TOKENS.labels(lane.name, "in").inc(sum(len(ids) for ids in encoded[1]))
                if not attempt:
                    permit.charge(sum(len(ids) for ids in encoded[1]))     # tokens/s, before anything is queued
            work[:] = [SequenceWork(ids, route, deadline, want_embedding) for ids in encoded[1]]
            lane.batcher.submit(work)
            try:
                results = self._wait(work, lane, deadline, timeout, started)
                return results, route.labels, sum(len(ids) for ids in encoded[1])
            except SequenceFailed as failure:
                for item in work:
                    item.abandon()
                if not failure.stale or attempt:
                    raise
                self.directory.invalidate(tenant_id=request.tenant_id, domain=route.domain)
        raise AssertionError("unreachable")

    def _wait(self, work: list[SequenceWork], lane: ModelLane, deadline: float, timeout: float,
              started: float) -> list[SequenceResult]:
        """Every sequence's result; UNAVAILABLE (just before the deadline) when no replica was reachable the whole
        time, DEADLINE_EXCEEDED when replicas were there but too slow."""
        give_up = deadline - answer_margin(timeout)
        try:
            return [item.future.result(timeout=max(0.0, give_up - time.monotonic())) for item in work]
        except FutureTimeout:
            if not lane.router.usable_count():
                for item in work:
                    item.abandon()
                raise no_replica(lane.name, lane.router, time.monotonic() - started) from None
        try:
            return [item.future.result(timeout=max(0.0, deadline - time.monotonic())) for item in work]
        except FutureTimeout:
            for item in work:
                item.abandon()
            raise DeadlineExceeded(f"no result within the deadline of {timeout:.2f}s; the service is overloaded "
                                   f"or the deadline too short") from None

    @handles_errors
    def Classify(self, request, context) -> pb.ClassifyResponse:
        with metrics.observed("Classify", request.tenant_id, self._no_model) as observed:
            results, labels, tokens = self._run(request, context, want_embedding=False, observed=observed)
            response = pb.ClassifyResponse(prompt_tokens=tokens)
            for result in results:
                probabilities = softmax(result.logits.astype(np.float64))
                response.results.add(label=labels[int(np.argmax(probabilities))],
                                     probabilities=probabilities.tolist(), labels=labels)
            return response

    @handles_errors
    def Embed(self, request, context) -> pb.EmbedResponse:
        with metrics.observed("Embed", request.tenant_id, self._no_model) as observed:
            results, _, tokens = self._run(request, context, want_embedding=True, observed=observed)
            return pb.EmbedResponse(embeddings=[pb.Embedding(values=r.embedding.tolist()) for r in results],
                                    prompt_tokens=tokens)

    @staticmethod
    def _no_model() -> str:
        return ""

    @handles_stream_errors
    def Generate(self, request, context):
        with metrics.observed("Generate", request.tenant_id, self._no_model) as observed:
            yield from self._generate(request, context, observed)

    def _generate(self, request, context, observed: dict):
        arrived = time.monotonic()
        route = self.authorized_route(request.tenant_id, context, "Generate")
        permit = self.quotas.admit(request.tenant_id, route.limits)     # before any work
        context.add_callback(permit.release)
        try:
            yield from self._generate_admitted(request, context, observed, arrived, route, permit)
        finally:
            permit.release()

    def _generate_admitted(self, request, context, observed: dict, arrived: float, route: TenantRoute,
                           permit: Permit):
        if route.labels:
            raise FailedPrecondition(f"tenant {request.tenant_id!r} is a classifier: call Classify or Embed")
        lane = self._lane(route)
        support = lane.generation
        if support is None:
            raise FailedPrecondition(f"base model {route.model!r} is an encoder: it classifies and embeds, it does "
                                     f"not generate")
        observed["model"] = lane.name
        timeout = remaining_timeout(context, support.timeout)
        deadline = arrived + timeout
        plan = plan_generation(support.tokenizer, request, support.limits, max_positions=support.max_positions,
                               eos_token_ids=support.eos_token_ids)
        permit.charge(len(plan.prompt_ids) + plan.max_new_tokens)      # tokens/s: what it may cost at most
        metrics.TOKENS.labels(lane.name, "in").inc(len(plan.prompt_ids))
        generated = [0]
        try:
            yield from self._stream(request, context, observed, arrived, route, lane, plan, timeout, deadline,
                                    generated)
        finally:
            permit.give_back(plan.max_new_tokens - generated[0])       # a stream that stopped early costs less

    def _stream(self, request, context, observed: dict, arrived: float, route: TenantRoute, lane: ModelLane, plan,
                timeout: float, deadline: float, generated: list[int]):
        support = lane.generation
        streamer = TextStreamer(support.tokenizer, plan.stop)
        first = True
        last_token_at = None
        tried: set[str] = set()
        while True:
            replica = self._generation_replica(lane, route, deadline, timeout, arrived, tried)
            call = self._start_generation(replica, route, plan, max(0.05, deadline - time.monotonic()))
            context.add_callback(call.cancel)        # the client went away: compute frees the KV cache
            received = False
            try:
                for message in call:
                    received = True
                    generated[0] += len(message.token_ids)
                    if message.token_ids:
                        now = time.monotonic()
                        if last_token_at is None:
                            metrics.TTFT_SECONDS.labels(lane.name).observe(now - arrived)
                        else:
                            metrics.INTER_TOKEN_SECONDS.labels(lane.name).observe(now - last_token_at)
                        last_token_at = now
                        metrics.TOKENS.labels(lane.name, "out").inc(len(message.token_ids))
                    ids = [t for t in message.token_ids if t not in plan.stop_token_ids]
                    piece = streamer.add(ids) if ids else ""
                    reason = "stop" if streamer.stopped else message.finish_reason
                    if reason:
                        piece += streamer.flush()
                    if piece or ids or reason or first:
                        yield pb.GenerateTextResponse(text=piece, token_ids=list(message.token_ids),
                                                      finish_reason=reason,
                                                      prompt_tokens=len(plan.prompt_ids) if first else 0)
                        first = False
                    if reason:
                        call.cancel()
                        return
                return
            except grpc.RpcError as error:
                # Before compute answered anything the request may go to another replica (nothing was generated).
                if received or not replica_unreachable(error) or time.monotonic() >= deadline - answer_margin(timeout):
                    raise
                support.router.report_failure(replica)
                tried.add(replica.address)

    def _generation_replica(self, lane: ModelLane, route: TenantRoute, deadline: float, timeout: float,
                            arrived: float, tried: set[str]) -> Replica:
        """The tenant's home replica (or the next usable one, skipping those tried); waits for one within the
        deadline."""
        router = lane.generation.router
        while True:
            ranked = router.ranked(route.tenant_id)
            choice = next((r for r in ranked if r.address not in tried), ranked[0] if ranked else None)
            if choice is not None:
                router.claim(choice)
                return choice
            if not router.wait_usable(deadline - answer_margin(timeout)):
                raise no_replica(lane.name, router, time.monotonic() - arrived)

    def _start_generation(self, replica: Replica, route: TenantRoute, plan, timeout: float):
        sequence = Sequence(route.tenant_id, route.adapter_version, route.domain, route.split_layer, route.model,
                            route.domain_revision, plan.prompt_ids)
        request = generate_request(sequence, self.quotas.effective(route.limits).weight, plan.max_new_tokens,
                                   plan.temperature, plan.top_k, plan.top_p, plan.seed, list(plan.stop_token_ids))
        return replica.stub.Generate(request, timeout=timeout, metadata=tracing.outgoing_metadata())


class Relayed:
    """A client stream passed on to the store. When one of its messages does not parse, gRPC cancels the call to
    the store (which so never sees half a stream) and reports UNKNOWN; `answer` gives the real reason instead."""

    def __init__(self, requests) -> None:
        self._requests = iter(requests)
        self._first: list = []
        self.error: UndecodableRequest | None = None

    def __iter__(self) -> "Relayed":
        return self

    def __next__(self):
        if self._first:
            return self._first.pop()
        try:
            return next(self._requests)
        except UndecodableRequest as error:
            self.error = error
            raise

    def first(self):
        """The first message (None for an empty stream), still passed on with the rest."""
        if not self._first:
            message = next(self, None)
            if message is None:
                return None
            self._first.append(message)
        return self._first[0]

    def answer(self, error: grpc.RpcError) -> BaseException:
        return self.error if self.error is not None else error


def call_options(context, default_timeout: float) -> dict:
    """The caller's deadline, request id and trace context, for the store call an admin call becomes."""
    return {"timeout": remaining_timeout(context, default_timeout), "metadata": tracing.outgoing_metadata()}


MAX_SCOPES_CACHED = 10_000


class AdminServicer(pb_grpc.AdminServicer):
    """Proxies to the knowledge store and keeps the tenant directory fresh; domains, keys, limits and backups
    are the admin's, tenants are their keys' (access.py)."""

    def __init__(self, store: store_grpc.KnowledgeStoreStub, directory: TenantDirectory,
                 access: Access | None = None) -> None:
        self.store = store
        self.directory = directory
        self.access = access or open_access()
        self._domain_scopes: dict[str, tuple[int, frozenset[str]]] = {}

    def _who(self, context) -> Principal:
        return self.access.principal(context.invocation_metadata())

    def _admin(self, context, what: str) -> None:
        self._who(context).require_admin(what)

    # ---- domains --------------------------------------------------------------------------------

    def _visible_domains(self, principal: Principal, context) -> frozenset[str]:
        """A key's domains: those it names and those its registered tenants belong to (cached until a tenant
        or domain changes)."""
        generation = self.directory.feed.generation
        cached = self._domain_scopes.get(principal.name)
        if cached is not None and cached[0] == generation:
            return cached[1]
        domains = set(principal.domains)
        for tenant in self._tenants(context):
            if principal.covers(tenant.spec.tenant_id):
                domains.add(tenant.spec.domain)
        visible = frozenset(domains)
        if len(self._domain_scopes) >= MAX_SCOPES_CACHED:
            self._domain_scopes.clear()
        self._domain_scopes[principal.name] = (generation, visible)
        return visible

    def _require_domain(self, principal: Principal, domain: str, what: str, context) -> None:
        if principal.admin:
            return
        if domain not in self._visible_domains(principal, context):
            REFUSED.labels("permission_denied").inc()
            raise PermissionDenied(f"{what} in domain {domain!r}: {principal.name} reaches only the domains its "
                                   f"tenants belong to and those it was made with (hmi key create --domains)")

    @handles_stream_errors
    def BuildDomain(self, request_iterator, context):
        self._admin(context, "BuildDomain")
        yield from self._job(self.store.BuildDomain, request_iterator, context)

    @handles_stream_errors
    def AdaptDomain(self, request_iterator, context):
        self._admin(context, "AdaptDomain")
        yield from self._job(self.store.AdaptDomain, request_iterator, context)

    def _job(self, method, request_iterator, context):
        requests = Relayed(request_iterator)
        try:
            for progress in method(requests, **call_options(context, BUILD_TIMEOUT)):
                if progress.stage == "done":
                    self.directory.invalidate(domain=progress.domain.spec.name)
                yield progress
        except grpc.RpcError as error:
            raise requests.answer(error) from None

    @handles_errors
    def GetDomain(self, request, context):
        self._require_domain(self._who(context), request.name, "GetDomain", context)
        return self.store.GetDomain(request, **call_options(context, ADMIN_TIMEOUT))

    @handles_errors
    def ListDomains(self, request, context):
        principal = self._who(context)
        reply = self.store.ListDomains(request, **call_options(context, ADMIN_TIMEOUT))
        if principal.admin:
            return reply
        visible = self._visible_domains(principal, context)
        return store_pb.ListDomainsResponse(domains=[d for d in reply.domains if d.spec.name in visible])

    @handles_errors
    def DeleteDomain(self, request, context):
        self._admin(context, "DeleteDomain")
        response = self.store.DeleteDomain(request, **call_options(context, ADMIN_TIMEOUT))
        self.directory.invalidate(domain=request.name)
        return response

    @handles_stream_errors
    def Lookup(self, request, context):
        principal = self._who(context)
        principal.require_tenant_admin("Lookup (PLOT vectors, what training reads)")
        self._require_domain(principal, request.domain, "Lookup", context)
        yield from self.store.Lookup(request, **call_options(context, ADMIN_TIMEOUT))

    # ---- tenants --------------------------------------------------------------------------------

    @handles_errors
    def RegisterTenant(self, request_iterator, context) -> store_pb.Tenant:
        principal = self._who(context)
        requests = Relayed(request_iterator)
        if not principal.admin:
            first = requests.first()
            if first is None or first.WhichOneof("item") != "spec":
                raise InvalidArgument("the stream must start with the tenant's spec")
            principal.require_tenant(first.spec.tenant_id, "RegisterTenant", manage=True)
            self._require_domain(principal, first.spec.domain, "RegisterTenant", context)
        try:
            tenant = self.store.PutTenant(requests, **call_options(context, ADMIN_TIMEOUT))
        except grpc.RpcError as error:
            raise requests.answer(error) from None
        self.directory.invalidate(tenant_id=tenant.spec.tenant_id)
        return tenant

    @handles_errors
    def GetTenant(self, request, context):
        self._who(context).require_tenant(request.tenant_id, "GetTenant")
        return self.store.GetTenant(request, **call_options(context, ADMIN_TIMEOUT))

    def _tenants(self, context, domain: str = "") -> list[store_pb.Tenant]:
        return list(self.store.ListTenants(store_pb.ListTenantsRequest(domain=domain),
                                           **call_options(context, ADMIN_TIMEOUT)).tenants)

    @handles_errors
    def ListTenants(self, request, context):
        principal = self._who(context)
        if principal.admin:
            return self.store.ListTenants(request, **call_options(context, ADMIN_TIMEOUT))
        if request.limit < 0:
            raise InvalidArgument("limit must be >= 0")
        mine = [t for t in self._tenants(context, request.domain) if principal.covers(t.spec.tenant_id)]
        page = [t for t in mine if t.spec.tenant_id > request.after]
        return store_pb.ListTenantsResponse(tenants=page[:request.limit] if request.limit else page, total=len(mine))

    @handles_stream_errors
    def GetAdapter(self, request, context):
        self._who(context).require_tenant(request.tenant_id, "GetAdapter (exporting its weights)", manage=True)
        yield from self.store.GetAdapter(request, **call_options(context, ADMIN_TIMEOUT))

    @handles_stream_errors
    def GetBridge(self, request, context):
        principal = self._who(context)          # like Lookup: what training applies to the PLOT rows it reads
        principal.require_tenant_admin("GetBridge (a domain's bridge, what training reads)")
        self._require_domain(principal, request.domain, "GetBridge", context)
        yield from self.store.GetBridge(request, **call_options(context, ADMIN_TIMEOUT))

    @handles_errors
    def DeleteTenant(self, request, context):
        self._who(context).require_tenant(request.tenant_id, "DeleteTenant", manage=True)
        response = self.store.DeleteTenant(request, **call_options(context, ADMIN_TIMEOUT))
        self.directory.invalidate(tenant_id=request.tenant_id)
        return response

    # ---- the store, keys and limits: the admin's ---------------------------------------------

    @handles_errors
    def Backup(self, request, context):
        self._admin(context, "Backup")
        return self.store.Backup(request, **call_options(context, BUILD_TIMEOUT))

    @handles_errors
    def CreateKey(self, request, context):
        self._admin(context, "CreateKey")
        return self.store.CreateKey(request, **call_options(context, ADMIN_TIMEOUT))

    @handles_errors
    def ListKeys(self, request, context):
        self._admin(context, "ListKeys")
        return self.store.ListKeys(request, **call_options(context, ADMIN_TIMEOUT))

    @handles_errors
    def RevokeKey(self, request, context):
        self._admin(context, "RevokeKey")
        return self.store.RevokeKey(request, **call_options(context, ADMIN_TIMEOUT))

    @handles_errors
    def SetTenantLimits(self, request, context):
        self._admin(context, "SetTenantLimits")
        limits = self.store.SetTenantLimits(request, **call_options(context, ADMIN_TIMEOUT))
        self.directory.invalidate(tenant_id=limits.tenant_id)
        return limits

    @handles_errors
    def GetTenantLimits(self, request, context):
        self._who(context).require_tenant(request.tenant_id, "GetTenantLimits")
        return self.store.GetTenantLimits(request, **call_options(context, ADMIN_TIMEOUT))
