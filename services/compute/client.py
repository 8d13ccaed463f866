"""Compute's wire client: what the gateway (and `hmi bench`) send a compute replica and read back.

Forward takes a packed batch of sequences and answers, per sequence, its logits and embedding or the failure of
its own tenant or domain (the rest of the batch ran). Generate streams one sequence's tokens. Whether a failed
call means the replica itself was not reached, so that another replica may run the same work, is decided from
the status code and a marker, never from message text: every HMI service marks an UNAVAILABLE it answers itself
(a peer of its own is down; services/common/rpc.py), so an unmarked UNAVAILABLE came from the transport (no
connection, or a server shutting down) and nothing ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import grpc
import numpy as np

from hmi_proto.v1 import compute_pb2 as pb
from hmi_proto.v1 import compute_pb2_grpc as pb_grpc
from services.common import tracing
from services.common.codec import decode_tensor, encode_tensor
from services.common.errors import HMIError, Unavailable
from services.common.rpc import ANSWERED_UNAVAILABLE, peer_error, peer_status


@dataclass(frozen=True)
class Sequence:
    """One sequence of a Forward batch: whose adapter, which domain's PLOT, and its token ids."""
    tenant_id: str
    adapter_version: int
    domain: str
    split_layer: int
    model: str
    domain_revision: int
    token_ids: np.ndarray
    want_embedding: bool = False
    weight: float = 1.0         # the tenant's share in compute's fair execution order


@dataclass
class SequenceOutput:
    logits: np.ndarray | None
    embedding: np.ndarray | None


@dataclass
class SequenceFailure:
    """Compute could not run this sequence (the others ran): a gRPC status code name, a message, and whether the
    tenant or domain changed since it was resolved (resolving it again may fix it)."""
    code: str
    message: str
    stale: bool


@dataclass
class ForwardReply:
    outputs: list[SequenceOutput | SequenceFailure]
    fetch_ms: float
    queue_ms: float
    execute_ms: float


def forward_request(sequences: list[Sequence]) -> pb.ForwardRequest:
    lengths = [len(s.token_ids) for s in sequences]
    return pb.ForwardRequest(
        token_ids=encode_tensor(np.concatenate([s.token_ids for s in sequences]).astype(np.int32)),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).tolist(),
        sequences=[pb.SequenceSpec(tenant_id=s.tenant_id, adapter_version=s.adapter_version, domain=s.domain,
                                   split_layer=s.split_layer, model=s.model, domain_revision=s.domain_revision,
                                   weight=s.weight)
                   for s in sequences],
        want_logits=True, want_embeddings=any(s.want_embedding for s in sequences))


def read_forward_reply(response: pb.ForwardResponse, sequences: list[Sequence]) -> ForwardReply:
    """Raises InvalidArgument when the reply does not fit the request (a malformed answer)."""
    logits = decode_tensor(response.logits, field="logits") if response.logit_offsets else None
    embeddings = decode_tensor(response.embeddings, field="embeddings") if response.embeddings.shape else None
    offsets = list(response.logit_offsets)
    failures = {failure.index: failure for failure in response.failures}
    outputs: list[SequenceOutput | SequenceFailure] = []
    for index, sequence in enumerate(sequences):
        failure = failures.get(index)
        if failure is not None:
            outputs.append(SequenceFailure(failure.code, failure.message, failure.stale))
            continue
        outputs.append(SequenceOutput(
            logits=logits[offsets[index]:offsets[index + 1]] if logits is not None else None,
            embedding=embeddings[index] if embeddings is not None and sequence.want_embedding else None))
    return ForwardReply(outputs, response.fetch_ms, response.queue_ms, response.execute_ms)


def forward(stub: "ComputeStub", sequences: list[Sequence], timeout: float, on_done: Callable[[object], None], *,
            traces: list | None = None, request_ids: str | None = None) -> None:
    """Sends one batch without waiting; `on_done` (on a gRPC thread) gets its ForwardReply, or its failure:
    ReplicaUnreachable (nothing ran: another replica may run the batch) or the HMIError of the status compute
    answered (or InvalidArgument for a reply that does not fit the request). `traces`: the trace contexts of the
    requests the batch serves (one client span links them all)."""
    request = forward_request(sequences)
    span = tracing.start_client_span("hmi.v1.Compute/Forward", traces or [])
    metadata = tracing.outgoing_metadata(request_ids, span)

    def done(call) -> None:
        try:
            response = call.result()
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
            tracing.end_span(span, code)
            on_done(failure_of(error))
            return
        except Exception as error:  # noqa: BLE001 - a cancelled future or a broken channel fails the batch only
            tracing.end_span(span, grpc.StatusCode.INTERNAL)
            on_done(HMIError(f"internal error: {type(error).__name__}: {error}"))
            return
        tracing.end_span(span, grpc.StatusCode.OK)
        try:
            on_done(read_forward_reply(response, sequences))
        except HMIError as error:
            on_done(error)

    try:
        call = stub.Forward.future(request, timeout=timeout, metadata=metadata)
    except Exception:
        tracing.end_span(span, grpc.StatusCode.INTERNAL)
        raise
    call.add_done_callback(done)


def failure_of(error: grpc.RpcError) -> HMIError:
    """ReplicaUnreachable when the replica itself was not reached, else the HMIError of its answer."""
    if replica_unreachable(error):
        return ReplicaUnreachable(peer_status(error)[1])
    return peer_error(error)


def generate_request(sequence: Sequence, weight: float, params: "GenerationParams") -> pb.GenerateRequest:
    spec = pb.SequenceSpec(tenant_id=sequence.tenant_id, adapter_version=sequence.adapter_version,
                           domain=sequence.domain, split_layer=sequence.split_layer, model=sequence.model,
                           domain_revision=sequence.domain_revision, weight=weight)
    sampling = pb.SamplingParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                                 top_k=params.top_k, top_p=params.top_p, seed=params.seed,
                                 stop_token_ids=list(params.stop_token_ids), logprobs=params.logprobs,
                                 top_logprobs=params.top_logprobs, prompt_logprobs=params.prompt_logprobs,
                                 presence_penalty=params.presence_penalty,
                                 frequency_penalty=params.frequency_penalty,
                                 repetition_penalty=params.repetition_penalty,
                                 output_pattern=params.output_pattern, kv_budget=params.kv_budget)
    return pb.GenerateRequest(sequence=spec, prompt_ids=sequence.token_ids.tolist(), params=sampling)


def replica_unreachable(error: BaseException) -> bool:
    """The replica itself could not be reached (not: it answered that a peer of its own is down): nothing ran,
    so another replica may run the work."""
    if not isinstance(error, grpc.RpcError) or not hasattr(error, "code"):
        return False
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return not any(key == ANSWERED_UNAVAILABLE for key, _value in (metadata or ()))


class ReplicaUnreachable(Unavailable):
    """The replica itself could not be reached: nothing ran, so another replica may run the same work."""


@dataclass(frozen=True)
class GenerationParams:
    """How one sequence is sampled (the gateway validated every value)."""
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: tuple[int, ...]
    logprobs: bool = False           # each generated token's log-probability
    top_logprobs: int = 0            # and its so many likeliest alternatives
    prompt_logprobs: bool = False    # the prompt's tokens' too (on the first message)
    presence_penalty: float = 0.0    # 0 = off
    frequency_penalty: float = 0.0   # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    output_pattern: str = ""         # structured output: the regex the text must match
    kv_budget: int = 0               # KV tokens kept per layer and head once decoding; 0 = all


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top: list[tuple[int, float]]     # (token id, log-probability), likeliest first


@dataclass(frozen=True)
class GeneratedTokens:
    """One message of a generation stream: the tokens sampled since the last, and why it ended (at the end)."""
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None          # per token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None   # prompt tokens 1.. (first message), when asked for


def _logprobs(messages) -> list[TokenLogprob]:
    return [TokenLogprob(m.logprob, list(zip(m.top_ids, m.top_logprobs))) for m in messages]


class GenerationStream:
    """Compute's tokens for one sequence. Iterating raises ReplicaUnreachable when the replica was not reached,
    else the HMIError of the status compute answered; `cancel` stops generation there (its KV cache is freed)."""

    def __init__(self, call) -> None:
        self._call = call

    def __iter__(self) -> Iterator[GeneratedTokens]:
        try:
            for message in self._call:
                yield GeneratedTokens(list(message.token_ids), message.finish_reason,
                                      _logprobs(message.logprobs) if message.logprobs else None,
                                      _logprobs(message.prompt_logprobs) if message.prompt_logprobs else None)
        except grpc.RpcError as error:
            raise failure_of(error) from None

    def cancel(self) -> None:
        self._call.cancel()


def generate(stub: "ComputeStub", sequence: Sequence, weight: float, params: GenerationParams,
             timeout: float) -> GenerationStream:
    """Starts generating one sequence on the replica behind `stub`."""
    request = generate_request(sequence, weight, params)
    return GenerationStream(stub.Generate(request, timeout=timeout, metadata=tracing.outgoing_metadata()))


ComputeStub = pb_grpc.ComputeStub


def compute_stub(channel: grpc.Channel) -> ComputeStub:
    return ComputeStub(channel)


def stats(channel: grpc.Channel, timeout: float = 10.0) -> pb.StatsResponse:
    return compute_stub(channel).Stats(pb.StatsRequest(), timeout=timeout)
