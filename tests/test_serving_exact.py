"""End to end through real processes: served logits equal an independent transformers reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from models.adapter_format import parse_adapter, random_adapter, serialize_adapter
from models.dims import ModelDims
from services.common.codec import decode_tensor, encode_tensor
from services.common.rpc import channel
from services.knowledge_store.client import StoreClient
from tests.reference import reference_logits, reference_logits_from_layer

pytestmark = pytest.mark.integration
TEXTS = ["the service was quick and friendly", "I would like to return this item",
         "rain is expected tomorrow", "great film , terrible ending"]
SENTENCE = "the cat sat on the mat"


@pytest.fixture(scope="module")
def dims(tiny_model_dir):
    return ModelDims.from_dir(tiny_model_dir)


def make_adapter(dims, labels: int, rank: int, seed: int, first_layer: int, targets=("query", "value")):
    adapter = random_adapter(dims, num_labels=labels, rank=rank, first_layer=first_layer, targets=targets, seed=seed)
    return serialize_adapter(adapter)


@pytest.fixture(scope="module")
def exact_tenants(client, dims):
    """Three tenants on a split-layer-0 domain: different ranks, targets and label counts."""
    client.build_domain("exact", "", split_layer=0, context=1, min_count=1)
    specs = {
        "exact-a": (2, 4, ("query", "value")),
        "exact-b": (3, 8, ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")),
        "exact-c": (5, 16, ("value", "ffn_out")),
    }
    adapters = {}
    for seed, (tenant, (labels, rank, targets)) in enumerate(specs.items(), start=1):
        data = make_adapter(dims, labels, rank, seed, 0, targets)
        client.register_tenant(tenant, "exact", [f"label{i}" for i in range(labels)], data)
        adapters[tenant] = parse_adapter(data, dims, num_labels=labels)
    return adapters


def test_mixed_batch_through_gateway_equals_merged_transformers(client, exact_tenants, tiny_model, tokenizer):
    calls = [(tenant, text) for text in TEXTS for tenant in exact_tenants]
    futures = [client.classify_future(tenant, [text]) for tenant, text in calls]
    for (tenant, text), future in zip(calls, futures):
        result = future.result().results[0]
        expected, _ = reference_logits(tiny_model, exact_tenants[tenant], tokenizer.encode(text).ids)
        probabilities = torch.softmax(expected, 0).numpy()
        np.testing.assert_allclose(result.probabilities, probabilities, atol=1e-4)
        assert result.label == result.labels[int(np.argmax(probabilities))]


def test_forward_on_compute_with_one_packed_mixed_batch(services, exact_tenants, tiny_model, tokenizer, client):
    """Guarantees one batch mixing three tenants (the gateway may split bursts): call compute directly."""
    versions = {t: client.get_tenant(t).adapter_version for t in exact_tenants}
    order = ["exact-b", "exact-a", "exact-c", "exact-a", "exact-b"]
    ids = [tokenizer.encode(TEXTS[i % len(TEXTS)]).ids for i in range(len(order))]
    request = compute_pb2.ForwardRequest(
        token_ids=encode_tensor(np.concatenate(ids).astype(np.int32)),
        offsets=np.concatenate([[0], np.cumsum([len(x) for x in ids])]).tolist(),
        sequences=[compute_pb2.SequenceSpec(tenant_id=t, adapter_version=versions[t], domain="exact", split_layer=0)
                   for t in order],
        want_logits=True, want_embeddings=True)
    stub = compute_pb2_grpc.ComputeStub(channel(services.compute_addrs[0], security=services.peer_security()))
    response = stub.Forward(request, timeout=60)
    logits = decode_tensor(response.logits)
    embeddings = decode_tensor(response.embeddings)
    for index, tenant in enumerate(order):
        expected, pooled = reference_logits(tiny_model, exact_tenants[tenant], ids[index])
        got = logits[response.logit_offsets[index]:response.logit_offsets[index + 1]]
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
        np.testing.assert_allclose(embeddings[index], pooled.numpy(), atol=1e-4)


def test_embed_returns_pooled_vector_of_the_tenant_model(client, exact_tenants, tiny_model, tokenizer):
    vectors = client.embed("exact-b", TEXTS[:2])
    for text, vector in zip(TEXTS[:2], vectors):
        _, pooled = reference_logits(tiny_model, exact_tenants["exact-b"], tokenizer.encode(text).ids)
        np.testing.assert_allclose(vector, pooled.numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def plot_domain(client, tokenizer):
    length = len(tokenizer.encode(SENTENCE).ids)
    domain = client.build_domain("one", SENTENCE, split_layer=2, context=length + 1, min_count=1)
    return domain


def test_lookup_returns_lower_model_outputs(services, plot_domain, tiny_model, tokenizer):
    ids = tokenizer.encode(SENTENCE).ids
    store = StoreClient(services.store_addr, security=services.peer_security())
    reply = store.lookup("one", np.asarray(ids, dtype=np.int32), np.asarray([0, len(ids)]))
    expected = tiny_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0]
    np.testing.assert_allclose(reply.vectors.astype(np.float32), expected.detach().numpy(), atol=2e-3, rtol=2e-3)
    assert reply.hit_depth_counts[len(ids) - 1] == 1, "the last token must match its full left context"


def test_token_absent_from_corpus_gets_its_depth1_vector(services, plot_domain, tiny_model, tokenizer):
    ids = tokenizer.encode("zebra").ids  # [CLS] zebra [SEP]: "zebra" is not in the corpus
    store = StoreClient(services.store_addr, security=services.peer_security())
    reply = store.lookup("one", np.asarray(ids, dtype=np.int32), np.asarray([0, len(ids)]))
    alone = tiny_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, 1]
    np.testing.assert_allclose(reply.vectors[1].astype(np.float32), alone.detach().numpy(), atol=2e-3, rtol=2e-3)
    assert reply.hit_depth_counts[0] >= 1


def test_plot_tenant_logits_equal_upper_layers_fed_with_plot(services, client, plot_domain, dims, tiny_model,
                                                              tokenizer):
    data = make_adapter(dims, 3, 8, 11, 2, ("query", "value", "ffn_in"))
    client.register_tenant("plot-a", "one", ["x", "y", "z"], data)
    adapter = parse_adapter(data, dims, num_labels=3)
    store = StoreClient(services.store_addr, security=services.peer_security())
    for text in (SENTENCE, "the mat sat on a cat"):
        ids = tokenizer.encode(text).ids
        plot = store.lookup("one", np.asarray(ids, dtype=np.int32), np.asarray([0, len(ids)])).vectors
        expected, _ = reference_logits_from_layer(tiny_model, adapter, torch.from_numpy(plot.astype(np.float32)), 2)
        result = client.classify("plot-a", [text])[0]
        np.testing.assert_allclose(list(result.probabilities.values()), torch.softmax(expected, 0).numpy(), atol=1e-4)


def test_one_batch_mixes_split_layers(services, client, plot_domain, exact_tenants, dims, tiny_model, tokenizer):
    """Sequences of an L=0 and an L=2 domain in one Forward: each enters the stack at its own layer."""
    data = make_adapter(dims, 2, 4, 12, 2)
    client.register_tenant("plot-b", "one", ["x", "y"], data)
    plot_adapter = parse_adapter(data, dims, num_labels=2)
    version_b = client.get_tenant("plot-b").adapter_version
    version_a = client.get_tenant("exact-a").adapter_version
    ids = [tokenizer.encode(SENTENCE).ids, tokenizer.encode(TEXTS[0]).ids]
    request = compute_pb2.ForwardRequest(
        token_ids=encode_tensor(np.concatenate(ids).astype(np.int32)),
        offsets=[0, len(ids[0]), len(ids[0]) + len(ids[1])],
        sequences=[compute_pb2.SequenceSpec(tenant_id="plot-b", adapter_version=version_b, domain="one", split_layer=2),
                   compute_pb2.SequenceSpec(tenant_id="exact-a", adapter_version=version_a, domain="exact",
                                            split_layer=0)],
        want_logits=True)
    response = compute_pb2_grpc.ComputeStub(channel(services.compute_addrs[0], security=services.peer_security())).Forward(request, timeout=60)
    logits = decode_tensor(response.logits)
    plot = StoreClient(services.store_addr, security=services.peer_security()).lookup("one", np.asarray(ids[0], dtype=np.int32),
                                                   np.asarray([0, len(ids[0])])).vectors
    expected_plot, _ = reference_logits_from_layer(tiny_model, plot_adapter, torch.from_numpy(plot.astype(np.float32)), 2)
    expected_full, _ = reference_logits(tiny_model, exact_tenants["exact-a"], ids[1])
    np.testing.assert_allclose(logits[:2], expected_plot.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits[2:], expected_full.numpy(), atol=1e-4)


def test_lookup_larger_than_one_chunk_streams_in_order(services, plot_domain, tokenizer):
    """12,000 tokens x 64 dims x fp16 = 1.5 MiB: more than one 1 MiB chunk, reassembled in order."""
    ids = np.asarray(tokenizer.encode(SENTENCE).ids, dtype=np.int32)
    repeats = 12_000 // len(ids) + 1
    packed = np.tile(ids, repeats)
    offsets = np.arange(0, len(packed) + 1, len(ids))
    store = StoreClient(services.store_addr, security=services.peer_security())
    reply = store.lookup("one", packed, offsets)
    single = store.lookup("one", ids, np.asarray([0, len(ids)])).vectors
    assert reply.vectors.nbytes > 1 << 20
    np.testing.assert_array_equal(reply.vectors, np.tile(single, (repeats, 1)))
