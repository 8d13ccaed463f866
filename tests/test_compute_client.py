"""The compute client decides from status and marker, never from message text, whether a replica was reached."""
from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from services.common.codec import encode_tensor
from services.common.errors import Unavailable
from services.common.rpc import handles_errors
from services.compute.client import (
    Sequence,
    SequenceFailure,
    SequenceOutput,
    compute_stub,
    forward_request,
    read_forward_reply,
    replica_unreachable,
)


class PeerDown(compute_pb2_grpc.ComputeServicer):
    @handles_errors
    def Stats(self, request, context):
        raise Unavailable("the knowledge store is unreachable (a peer service is unavailable)")


def test_unreachable_only_when_the_replica_did_not_answer():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    compute_pb2_grpc.add_ComputeServicer_to_server(PeerDown(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as answered:
            compute_stub(channel).Stats(compute_pb2.StatsRequest(), timeout=5)
        assert answered.value.code() == grpc.StatusCode.UNAVAILABLE and not replica_unreachable(answered.value)
    finally:
        server.stop(0)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as refused:
        compute_stub(channel).Stats(compute_pb2.StatsRequest(), timeout=5)     # nothing listens there now
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and replica_unreachable(refused.value)


def test_a_forward_reply_is_read_back_per_sequence():
    sequences = [Sequence("a", 1, "d", 3, "m", 7, np.array([5, 6, 7], dtype=np.int32), want_embedding=True),
                 Sequence("b", 2, "d", 3, "m", 7, np.array([8], dtype=np.int32))]
    request = forward_request(sequences)
    assert list(request.offsets) == [0, 3, 4] and request.want_embeddings
    assert [s.tenant_id for s in request.sequences] == ["a", "b"]
    response = compute_pb2.ForwardResponse(
        logits=encode_tensor(np.array([0.1, 0.9], dtype=np.float32)), logit_offsets=[0, 2, 2],
        embeddings=encode_tensor(np.ones((2, 4), dtype=np.float32)), fetch_ms=1.0, queue_ms=2.0, execute_ms=3.0,
        failures=[compute_pb2.SequenceFailure(index=1, code="NOT_FOUND", message="gone", stale=True)])
    reply = read_forward_reply(response, sequences)
    assert isinstance(reply.outputs[0], SequenceOutput) and reply.outputs[0].logits.tolist() == [
        np.float32(0.1), np.float32(0.9)]
    assert reply.outputs[0].embedding.shape == (4,)
    assert reply.outputs[1] == SequenceFailure("NOT_FOUND", "gone", True)
    assert (reply.fetch_ms, reply.queue_ms, reply.execute_ms) == (1.0, 2.0, 3.0)
