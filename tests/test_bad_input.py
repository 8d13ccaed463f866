"""Bad input gets a clear status and never crashes a service; the services answer afterwards."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from hmi_client.v1 import tensor_pb2
from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from models.adapter_format import random_adapter, serialize_adapter
from models.dims import ModelDims
from services.common.rpc import channel
from tests.helpers import expect_status

pytestmark = pytest.mark.integration
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def domain(client):
    client.build_domain("bad-input", "a small corpus line\nanother small line", split_layer=1, context=2,
                        min_count=1)
    client.register_tenant("good", "bad-input", ["no", "yes"], seed=5)
    return "bad-input"


def still_serving(client) -> None:
    assert client.classify("good", ["still here"])[0].label in ("no", "yes")


def test_unknown_tenant_is_not_found(client, domain):
    message = expect_status(Code.NOT_FOUND, client.classify, "nobody", ["hello"])
    assert "nobody" in message
    still_serving(client)


def test_unknown_domain_is_not_found(client, domain):
    expect_status(Code.NOT_FOUND, client.register_tenant, "orphan", "no-such-domain", ["a", "b"])
    expect_status(Code.NOT_FOUND, client.get_domain, "no-such-domain")
    still_serving(client)


def test_empty_text_and_no_text_are_invalid(client, domain):
    assert "empty" in expect_status(Code.INVALID_ARGUMENT, client.classify, "good", ["   "])
    expect_status(Code.INVALID_ARGUMENT, client.classify, "good", [])
    still_serving(client)


def test_text_over_the_maximum_length_is_invalid(client, domain):
    message = expect_status(Code.INVALID_ARGUMENT, client.classify, "good", ["word " * 600])
    assert "maximum" in message and "256" in message and "truncate" in message
    # Asked to truncate, the gateway serves the head of the text: the same result as sending the head itself.
    # Both go in one request so that they meet the same PLOT: between two requests the store may learn new
    # contexts from the traffic, which changes the rows (and the probabilities) of repeated text like this.
    long_text = "word " * 300 + "tail"
    truncated, head = client.classify("good", [long_text, "word " * 254], truncate=True)
    assert truncated.probabilities == pytest.approx(head.probabilities, abs=1e-5)
    still_serving(client)


def test_wrong_label_count_is_invalid(client, domain, tiny_model_dir):
    dims = ModelDims.from_dir(tiny_model_dir)
    adapter = serialize_adapter(random_adapter(dims, num_labels=3, rank=4, first_layer=1, seed=1))
    message = expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "wrong-labels", domain, ["a", "b"], adapter)
    assert "label" in message
    expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "one-label", domain, ["only"])
    expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "dup-labels", domain, ["a", "a"])
    still_serving(client)


@pytest.mark.parametrize("payload", [b"not a safetensors file", b"\x10\x00\x00\x00\x00\x00\x00\x00{bad json",
                                     save_safetensors({"something.else": torch.zeros(2)})])
def test_malformed_adapter_is_invalid(client, domain, payload):
    expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "bad-adapter", domain, ["a", "b"], payload)
    expect_status(Code.NOT_FOUND, client.get_tenant, "bad-adapter")
    still_serving(client)


def test_invalid_names_and_specs(client, domain):
    expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "has space", domain, ["a", "b"])
    expect_status(Code.INVALID_ARGUMENT, client.build_domain, "too-deep", "text", split_layer=99, context=2,
                  min_count=1)
    expect_status(Code.INVALID_ARGUMENT, client.build_domain, "no-corpus", "", split_layer=1, context=2, min_count=1)
    still_serving(client)


def forward(services, request):
    return compute_pb2_grpc.ComputeStub(channel(services.compute_addrs[0], security=services.peer_security())).Forward(
        request, timeout=30)


def test_malformed_tensors_to_compute_are_invalid(services, client, domain):
    spec = compute_pb2.SequenceSpec(tenant_id="good", adapter_version=1, domain=domain, split_layer=1)
    bad_bytes = compute_pb2.ForwardRequest(token_ids=tensor_pb2.Tensor(dtype="int32", shape=[4], data=b"\x00" * 15),
                                           offsets=[0, 4], sequences=[spec])
    assert "bytes" in expect_status(Code.INVALID_ARGUMENT, forward, services, bad_bytes)
    bad_dtype = compute_pb2.ForwardRequest(token_ids=tensor_pb2.Tensor(dtype="complex64", shape=[1], data=b"1234"),
                                           offsets=[0, 1], sequences=[spec])
    expect_status(Code.INVALID_ARGUMENT, forward, services, bad_dtype)
    ids = np.array([101, 7592, 102], dtype=np.int32)
    bad_offsets = compute_pb2.ForwardRequest(token_ids=tensor_pb2.Tensor(dtype="int32", shape=[3], data=ids.tobytes()),
                                             offsets=[0, 5], sequences=[spec])
    expect_status(Code.INVALID_ARGUMENT, forward, services, bad_offsets)
    bad_ids = compute_pb2.ForwardRequest(
        token_ids=tensor_pb2.Tensor(dtype="int32", shape=[3], data=np.array([1, -5, 10**8], np.int32).tobytes()),
        offsets=[0, 3], sequences=[spec])
    expect_status(Code.INVALID_ARGUMENT, forward, services, bad_ids)
    still_serving(client)


def test_stale_split_layer_is_refused_not_mis_served(services, client, domain):
    """A request built before a domain was rebuilt with another L must not enter the stack at the old L."""
    ids = np.array([101, 7592, 102], dtype=np.int32)
    spec = compute_pb2.SequenceSpec(tenant_id="good", adapter_version=client.get_tenant("good").adapter_version,
                                    domain=domain, split_layer=2)  # the domain's L is 1
    request = compute_pb2.ForwardRequest(token_ids=tensor_pb2.Tensor(dtype="int32", shape=[3], data=ids.tobytes()),
                                         offsets=[0, 3], sequences=[spec], want_logits=True)
    response = forward(services, request)      # the sequence fails alone, marked stale: the gateway resolves again
    assert [(f.index, f.code, f.stale) for f in response.failures] == [(0, "FAILED_PRECONDITION", True)]
    assert "split layer 1" in response.failures[0].message
    assert list(response.logit_offsets) == [0, 0]
    still_serving(client)


def test_unservable_adapters_are_refused_at_registration(client, domain, tiny_model_dir):
    from tests.test_store_limits import adapter_with
    dims = ModelDims.from_dir(tiny_model_dir)
    for alpha in ("nan", "inf", "1e38"):
        assert "alpha" in expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "bad-alpha", domain,
                                        ["a", "b"], adapter_with(dims, alpha=alpha))
    big = serialize_adapter(random_adapter(dims, num_labels=2, rank=64, first_layer=1, seed=1))
    assert "--max-rank" in expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "bad-rank", domain,
                                         ["a", "b"], big)
    assert "empty" in expect_status(Code.INVALID_ARGUMENT, client.register_tenant, "bad-empty", domain, ["a", "b"],
                                    b"")
    expect_status(Code.NOT_FOUND, client.get_tenant, "bad-empty")
    still_serving(client)


def test_empty_and_oversized_names_are_invalid(client, domain):
    expect_status(Code.INVALID_ARGUMENT, client.get_tenant, "")
    expect_status(Code.INVALID_ARGUMENT, client.get_domain, "")
    expect_status(Code.INVALID_ARGUMENT, client.delete_tenant, "x" * 1000)
    expect_status(Code.INVALID_ARGUMENT, client.build_domain, "neg", "text", split_layer=-7, context=1, min_count=1)
    still_serving(client)


def test_characters_are_capped_before_tokenising(client, domain):
    client.build_domain("chars", "", split_layer=0, context=1, min_count=1)   # no PLOT: no learning between calls
    client.register_tenant("chars-t", "chars", ["no", "yes"], seed=5)
    long_text = "word " * 2000                     # 10,000 characters: above 16 x 256
    assert "--max-text-chars" in expect_status(Code.INVALID_ARGUMENT, client.classify, "chars-t", [long_text])
    truncated = client.classify("chars-t", [long_text], truncate=True)[0].probabilities
    head = client.classify("chars-t", ["word " * 254], truncate=False)[0].probabilities
    assert truncated == pytest.approx(head, abs=1e-5)      # cut, then truncated to the same head
    many = ["word " * 800] * 100                   # 400,000 characters in one request
    assert "--max-request-chars" in expect_status(Code.INVALID_ARGUMENT, client.classify, "good", many)
    still_serving(client)


def test_unbounded_input_gets_bounded_messages(services, client):
    """A 10 KB and a 1 MB tenant id, a 5,000-character backup path: INVALID_ARGUMENT with a short message, never
    gRPC's RESOURCE_EXHAUSTED for an oversized status or INTERNAL."""
    for size in (10_000, 1_000_000):
        message = expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.classify, "t" * size, ["hi"])
        assert len(message) < 1200 and f"{size:,} characters" in message
    message = expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.backup, "/" + "b" * 5000)
    assert len(message) < 1200
