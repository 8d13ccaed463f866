"""Public (Classify, Embed) and admin (domains, tenants) gRPC surfaces of the gateway."""
from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from prometheus_client import Counter, Histogram

from hmi.v1 import gateway_pb2 as pb
from hmi.v1 import gateway_pb2_grpc as pb_grpc
from hmi.v1 import knowledge_store_pb2 as store_pb
from hmi.v1 import knowledge_store_pb2_grpc as store_grpc
from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.rpc import handles_errors, handles_stream_errors, remaining_timeout
from services.gateway.batcher import Batcher, SequenceResult, SequenceWork
from services.gateway.directory import TenantDirectory
from services.gateway.tokenizer import TextEncoder

REQUESTS = Counter("hmi_gateway_requests_total", "requests", ["method"])
LATENCY = Histogram("hmi_gateway_request_seconds", "request latency", ["method"])
ADMIN_TIMEOUT = 60.0
BUILD_TIMEOUT = 6 * 3600.0


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, encoder: TextEncoder, directory: TenantDirectory, batcher: Batcher,
                 default_timeout: float = 30.0) -> None:
        self.encoder = encoder
        self.directory = directory
        self.batcher = batcher
        self.default_timeout = default_timeout

    def _run(self, request, context, want_embedding: bool) -> tuple[list[SequenceResult], tuple[str, ...]]:
        timeout = remaining_timeout(context, self.default_timeout)
        deadline = time.monotonic() + timeout
        if not request.tenant_id:
            raise InvalidArgument("tenant_id is required")
        route = self.directory.resolve(request.tenant_id, timeout)
        sequences = self.encoder.encode(list(request.texts), request.truncate)
        work = [SequenceWork(ids, route, deadline, want_embedding) for ids in sequences]
        self.batcher.submit(work)
        try:
            results = [item.future.result(timeout=max(0.0, deadline - time.monotonic())) for item in work]
        except FutureTimeout:
            for item in work:
                item.future.cancel()
            raise DeadlineExceeded(f"no result within the deadline of {timeout:.2f}s; the service is overloaded "
                                   f"or the deadline too short") from None
        return results, route.labels

    @handles_errors
    def Classify(self, request, context) -> pb.ClassifyResponse:
        REQUESTS.labels("Classify").inc()
        with LATENCY.labels("Classify").time():
            results, labels = self._run(request, context, want_embedding=False)
            response = pb.ClassifyResponse()
            for result in results:
                probabilities = softmax(result.logits.astype(np.float64))
                response.results.add(label=labels[int(np.argmax(probabilities))],
                                     probabilities=probabilities.tolist(), labels=labels)
            return response

    @handles_errors
    def Embed(self, request, context) -> pb.EmbedResponse:
        REQUESTS.labels("Embed").inc()
        with LATENCY.labels("Embed").time():
            results, _ = self._run(request, context, want_embedding=True)
            return pb.EmbedResponse(embeddings=[pb.Embedding(values=r.embedding.tolist()) for r in results])


class AdminServicer(pb_grpc.AdminServicer):
    """Proxies to the knowledge store and keeps the tenant directory fresh."""

    def __init__(self, store: store_grpc.KnowledgeStoreStub, directory: TenantDirectory) -> None:
        self.store = store
        self.directory = directory

    @handles_stream_errors
    def BuildDomain(self, request_iterator, context):
        for progress in self.store.BuildDomain(request_iterator, timeout=remaining_timeout(context, BUILD_TIMEOUT)):
            if progress.stage == "done":
                self.directory.invalidate(domain=progress.domain.spec.name)
            yield progress

    @handles_stream_errors
    def AdaptDomain(self, request_iterator, context):
        for progress in self.store.AdaptDomain(request_iterator, timeout=remaining_timeout(context, BUILD_TIMEOUT)):
            if progress.stage == "done":
                self.directory.invalidate(domain=progress.domain.spec.name)
            yield progress

    @handles_errors
    def GetDomain(self, request, context):
        return self.store.GetDomain(request, timeout=remaining_timeout(context, ADMIN_TIMEOUT))

    @handles_errors
    def ListDomains(self, request, context):
        return self.store.ListDomains(request, timeout=remaining_timeout(context, ADMIN_TIMEOUT))

    @handles_errors
    def DeleteDomain(self, request, context):
        response = self.store.DeleteDomain(request, timeout=remaining_timeout(context, ADMIN_TIMEOUT))
        self.directory.invalidate(domain=request.name)
        return response

    @handles_errors
    def RegisterTenant(self, request_iterator, context) -> store_pb.Tenant:
        tenant = self.store.PutTenant(request_iterator, timeout=remaining_timeout(context, ADMIN_TIMEOUT))
        self.directory.invalidate(tenant_id=tenant.spec.tenant_id)
        return tenant

    @handles_errors
    def GetTenant(self, request, context):
        return self.store.GetTenant(request, timeout=remaining_timeout(context, ADMIN_TIMEOUT))

    @handles_errors
    def ListTenants(self, request, context):
        return self.store.ListTenants(request, timeout=remaining_timeout(context, ADMIN_TIMEOUT))

    @handles_stream_errors
    def Lookup(self, request, context):
        yield from self.store.Lookup(request, timeout=remaining_timeout(context, ADMIN_TIMEOUT))

    @handles_errors
    def DeleteTenant(self, request, context):
        response = self.store.DeleteTenant(request, timeout=remaining_timeout(context, ADMIN_TIMEOUT))
        self.directory.invalidate(tenant_id=request.tenant_id)
        return response
