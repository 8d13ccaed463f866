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

import grpc
import numpy as np

from hmi_proto.v1 import compute_pb2 as pb
from hmi_proto.v1 import compute_pb2_grpc as pb_grpc
from services.common.codec import decode_tensor, encode_tensor
from services.common.rpc import ANSWERED_UNAVAILABLE


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
                                   split_layer=s.split_layer, model=s.model, domain_revision=s.domain_revision)
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


def generate_request(sequence: Sequence, weight: float, max_new_tokens: int, temperature: float, top_k: int,
                     top_p: float, seed: int, stop_token_ids: list[int]) -> pb.GenerateRequest:
    spec = pb.SequenceSpec(tenant_id=sequence.tenant_id, adapter_version=sequence.adapter_version,
                           domain=sequence.domain, split_layer=sequence.split_layer, model=sequence.model,
                           domain_revision=sequence.domain_revision, weight=weight)
    params = pb.SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop_token_ids=stop_token_ids)
    return pb.GenerateRequest(sequence=spec, prompt_ids=sequence.token_ids.tolist(), params=params)


def replica_unreachable(error: BaseException) -> bool:
    """The replica itself could not be reached (not: it answered that a peer of its own is down): nothing ran,
    so another replica may run the work."""
    if not isinstance(error, grpc.RpcError) or not hasattr(error, "code"):
        return False
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return not any(key == ANSWERED_UNAVAILABLE for key, _value in (metadata or ()))


ComputeStub = pb_grpc.ComputeStub


def compute_stub(channel: grpc.Channel) -> ComputeStub:
    return ComputeStub(channel)


def stats(channel: grpc.Channel, timeout: float = 10.0) -> pb.StatsResponse:
    return compute_stub(channel).Stats(pb.StatsRequest(), timeout=timeout)
