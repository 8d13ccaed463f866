"""The gateway's gRPC door: the public (Classify, Embed, Generate) and admin (domains, tenants, keys, limits)
services, each method a translation of its messages into a call of the core (services/gateway/core) and back.

Who is calling (the `authorization: Bearer` metadata), the caller's deadline and the end of the call become the
core's `Call`; the core's HMIErrors become statuses at this edge (services/common/rpc.py)."""
from __future__ import annotations

from hmi_client.v1 import fine_tuning_pb2_grpc as ft_grpc
from hmi_client.v1 import gateway_pb2 as pb
from hmi_client.v1 import gateway_pb2_grpc as pb_grpc
from services.common.deadlines import NO_DEADLINE
from services.common.errors import InvalidArgument
from services.common.rpc import handles_errors, handles_stream_errors
from services.gateway.access import bearer_token
from services.gateway.core.admin import Admin
from services.gateway.core.call import Call
from services.gateway.core.fine_tuning import FineTuning
from services.gateway.core.inference import GenerateRequest, Inference, TextsRequest
from services.gateway.structured_output import OutputFormat


def _choice_pb(choice) -> pb.TokenChoice:
    message = pb.TokenChoice(id=choice.id, text=choice.text)
    if choice.logprob is not None:
        message.logprob = choice.logprob
    return message


def _logprobs_pb(entry) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(token=_choice_pb(entry.token), top=[_choice_pb(t) for t in entry.top])


def call_of(context) -> Call:
    """The core's view of a gRPC call; its cancellation fires when the RPC ends (or the client goes away)."""
    remaining = context.time_remaining()
    call = Call(bearer_token(context.invocation_metadata()),
                None if remaining is None or remaining > NO_DEADLINE else remaining)
    context.add_callback(call.cancellation.fire)
    return call


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, core: Inference) -> None:
        self.core = core

    @handles_errors
    def Classify(self, request, context) -> pb.ClassifyResponse:
        result = self.core.classify(call_of(context), TextsRequest(request.tenant_id, tuple(request.texts),
                                                                   request.truncate))
        response = pb.ClassifyResponse(prompt_tokens=result.prompt_tokens)
        for item in result.results:
            response.results.add(label=item.label, probabilities=item.probabilities, labels=item.labels)
        return response

    @handles_errors
    def Embed(self, request, context) -> pb.EmbedResponse:
        result = self.core.embed(call_of(context), TextsRequest(request.tenant_id, tuple(request.texts),
                                                                request.truncate))
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=e.tolist()) for e in result.embeddings],
                                prompt_tokens=result.prompt_tokens)

    @handles_stream_errors
    def Generate(self, request, context):
        generation = GenerateRequest(request.tenant_id, request.prompt, request.max_new_tokens, request.temperature,
                                     request.top_k, request.top_p, tuple(request.stop),
                                     request.seed if request.HasField("seed") else None,
                                     tuple(request.prompt_ids) if request.prompt_ids else None, request.ignore_eos,
                                     request.truncate_prompt_tokens,
                                     request.logprobs if request.HasField("logprobs") else None,
                                     request.prompt_logprobs, request.presence_penalty, request.frequency_penalty,
                                     request.repetition_penalty or 1.0, _output_format(request),
                                     request.session_id, request.kv_budget)
        for piece in self.core.generate(call_of(context), generation):
            yield pb.GenerateTextResponse(text=piece.text, token_ids=piece.token_ids,
                                          finish_reason=piece.finish_reason, prompt_tokens=piece.prompt_tokens,
                                          logprobs=[_logprobs_pb(e) for e in piece.logprobs or ()],
                                          prompt_logprobs=[_logprobs_pb(e) for e in piece.prompt_logprobs or ()])


    @handles_errors
    def Tokenize(self, request, context) -> pb.TokenizeResponse:
        call = call_of(context)
        texts = self.core.tokenize(call, request.tenant_id, list(request.texts), not request.no_special_tokens)
        response = pb.TokenizeResponse(max_model_len=self.core.token_limit(call, request.tenant_id))
        for tokens in texts:
            response.texts.add(ids=[t.id for t in tokens], pieces=[t.text for t in tokens],
                               starts=[t.start for t in tokens], ends=[t.stop for t in tokens],
                               special=[t.special for t in tokens])
        return response

    @handles_errors
    def Detokenize(self, request, context) -> pb.DetokenizeResponse:
        texts = self.core.detokenize(call_of(context), request.tenant_id, [list(s.ids) for s in request.sequences],
                                     skip_special_tokens=not request.keep_special_tokens)
        return pb.DetokenizeResponse(texts=texts)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, core: Admin) -> None:
        self.core = core

    @handles_stream_errors
    def BuildDomain(self, request_iterator, context):
        yield from self.core.build_domain(call_of(context), request_iterator)

    @handles_stream_errors
    def AdaptDomain(self, request_iterator, context):
        yield from self.core.adapt_domain(call_of(context), request_iterator)

    @handles_errors
    def GetDomain(self, request, context):
        return self.core.get_domain(call_of(context), request)

    @handles_errors
    def ListDomains(self, request, context):
        return self.core.list_domains(call_of(context), request)

    @handles_errors
    def DeleteDomain(self, request, context):
        return self.core.delete_domain(call_of(context), request)

    @handles_stream_errors
    def Lookup(self, request, context):
        yield from self.core.lookup(call_of(context), request)

    @handles_errors
    def RegisterTenant(self, request_iterator, context):
        return self.core.register_tenant(call_of(context), request_iterator)

    @handles_errors
    def GetTenant(self, request, context):
        return self.core.get_tenant(call_of(context), request)

    @handles_errors
    def ListTenants(self, request, context):
        return self.core.list_tenants(call_of(context), request)

    @handles_stream_errors
    def GetAdapter(self, request, context):
        yield from self.core.get_adapter(call_of(context), request)

    @handles_stream_errors
    def GetBridge(self, request, context):
        yield from self.core.get_bridge(call_of(context), request)

    @handles_errors
    def DeleteTenant(self, request, context):
        return self.core.delete_tenant(call_of(context), request)

    @handles_errors
    def Backup(self, request, context):
        return self.core.backup(call_of(context), request)

    @handles_errors
    def CreateKey(self, request, context):
        return self.core.create_key(call_of(context), request)

    @handles_errors
    def ListKeys(self, request, context):
        return self.core.list_keys(call_of(context), request)

    @handles_errors
    def RevokeKey(self, request, context):
        return self.core.revoke_key(call_of(context), request)

    @handles_errors
    def SetTenantLimits(self, request, context):
        return self.core.set_tenant_limits(call_of(context), request)

    @handles_errors
    def GetTenantLimits(self, request, context):
        return self.core.get_tenant_limits(call_of(context), request)


class FineTuningServicer(ft_grpc.FineTuningServicer):
    def __init__(self, core: FineTuning) -> None:
        self.core = core

    @handles_errors
    def UploadFile(self, request_iterator, context):
        return self.core.upload_file(call_of(context), request_iterator)

    @handles_errors
    def GetFile(self, request, context):
        return self.core.get_file(call_of(context), request.id)

    @handles_errors
    def ListFiles(self, request, context):
        return self.core.list_files(call_of(context))

    @handles_errors
    def DeleteFile(self, request, context):
        return self.core.delete_file(call_of(context), request.id)

    @handles_errors
    def CreateJob(self, request, context):
        return self.core.create_job(call_of(context), request)

    @handles_errors
    def GetJob(self, request, context):
        return self.core.get_job(call_of(context), request.id)

    @handles_errors
    def ListJobs(self, request, context):
        return self.core.list_jobs(call_of(context), request)

    @handles_errors
    def CancelJob(self, request, context):
        return self.core.cancel_job(call_of(context), request.id)

    @handles_stream_errors
    def ListJobEvents(self, request, context):
        yield from self.core.events(call_of(context), request)

    @handles_errors
    def ListCheckpoints(self, request, context):
        return self.core.checkpoints(call_of(context), request.id)


def _output_format(request) -> OutputFormat | None:
    if not request.HasField("output_format"):
        return None
    output = request.output_format
    kind = output.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument("output_format is set but names no format: set json_object, json_schema, regex or "
                              "choice")
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind == "choice":
        return OutputFormat("choice", choices=tuple(output.choice.options))
    return OutputFormat(kind, getattr(output, kind))
