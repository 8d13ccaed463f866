"""A re-registered tenant (or a recreated domain) is never served as its predecessor: versions are unique
over a name's whole history, and a write answers only once every gateway has read it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.adapter_format import parse_adapter, random_adapter, serialize_adapter
from models.dims import ModelDims
from services.common.errors import StaleVersion
from services.knowledge_store.store import KnowledgeStore, StoreSettings
from tests.helpers import extra_gateway
from tests.reference import reference_logits

pytestmark = pytest.mark.integration
TEXTS = ["the service was quick and friendly", "I would like to return this item"]


@pytest.fixture(scope="module")
def second_gateway(services, tiny_model_dir):
    """Another gateway on the same store and compute: its directory caches records on its own."""
    with extra_gateway(services, tiny_model_dir) as client:
        yield client


def expected_probabilities(tiny_model, tokenizer, adapter_bytes: bytes, dims, labels: int) -> list[np.ndarray]:
    adapter = parse_adapter(adapter_bytes, dims, num_labels=labels)
    return [torch.softmax(reference_logits(tiny_model, adapter, tokenizer.encode(text).ids)[0], 0).numpy()
            for text in TEXTS]


def test_reregistered_tenant_is_served_as_the_new_model_through_every_gateway(client, second_gateway, tiny_model,
                                                                             tokenizer, tiny_model_dir):
    dims = ModelDims.from_dir(tiny_model_dir)
    client.build_domain("stale", "", split_layer=0, context=1, min_count=1)
    gateways = {"first": client, "second": second_gateway}
    old = serialize_adapter(random_adapter(dims, num_labels=2, rank=4, first_layer=0, seed=1))
    client.register_tenant("reused", "stale", ["no", "yes"], old)
    for gateway in gateways.values():          # every gateway (and compute) now caches the first model
        assert [p.label for p in gateway.classify("reused", TEXTS)] != []
    for round_, (writer, seed, labels) in enumerate([("first", 2, ["red", "green", "blue"]),
                                                     ("second", 3, ["a", "b", "c", "d"])]):
        gateways[writer].delete_tenant("reused")
        new = serialize_adapter(random_adapter(dims, num_labels=len(labels), rank=8, first_layer=0, seed=seed))
        gateways[writer].register_tenant("reused", "stale", labels, new)
        expected = expected_probabilities(tiny_model, tokenizer, new, dims, len(labels))
        for name, gateway in gateways.items():     # at once, no waiting for a poll
            results = gateway.classify("reused", TEXTS)
            for result, probabilities in zip(results, expected):
                assert list(result.probabilities) == labels, f"round {round_}: gateway {name} served old labels"
                np.testing.assert_allclose(list(result.probabilities.values()), probabilities, atol=1e-4,
                                           err_msg=f"round {round_}: gateway {name} served another adapter")


def test_recreated_domain_and_tenant_are_served_as_new_through_every_gateway(client, second_gateway, tiny_model_dir):
    dims = ModelDims.from_dir(tiny_model_dir)
    client.build_domain("reborn", "the cat sat on the mat\nthe dog ran", split_layer=1, context=2, min_count=1)
    client.register_tenant("reborn-t", "reborn", ["x", "y"],
                           serialize_adapter(random_adapter(dims, num_labels=2, rank=4, first_layer=1, seed=5)))
    for gateway in (client, second_gateway):
        gateway.classify("reborn-t", TEXTS)
    client.delete_tenant("reborn-t")
    client.delete_domain("reborn")
    client.build_domain("reborn", "rain is expected tomorrow\nsunny all weekend", split_layer=2, context=1,
                        min_count=1)
    new = serialize_adapter(random_adapter(dims, num_labels=3, rank=4, first_layer=2, seed=6))
    client.register_tenant("reborn-t", "reborn", ["p", "q", "r"], new)
    client.register_tenant("reborn-fresh", "reborn", ["p", "q", "r"], new)   # the same model under a new id
    reference = client.classify("reborn-fresh", TEXTS)
    for gateway in (second_gateway, client):
        for got, want in zip(gateway.classify("reborn-t", TEXTS), reference):
            assert got.probabilities == pytest.approx(want.probabilities, abs=1e-5)


def test_versions_never_repeat_and_old_ones_are_refused(tmp_path, tiny_model_dir):
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path, model_dir=tiny_model_dir, model_name="tiny",
                                         map_size=1 << 26))
    try:
        store.build_domain("d", "", split_layer=0)
        first = store.put_tenant("t", "d", ["a", "b"], seed=1).adapter_version
        store.delete_tenant("t")
        second = store.put_tenant("t", "d", ["a", "b"], seed=2).adapter_version
        third = store.put_tenant("t", "d", ["a", "b"], seed=3).adapter_version
        assert first < second < third
        with pytest.raises(StaleVersion):
            store.get_adapter("t", first)
        assert store.get_adapter("t", third)[0].adapter_version == third

        built = store.build_domain("p", "one line of text\nanother line", split_layer=1, context=1, min_count=1)
        rebuilt = store.build_domain("p", "one line of text", split_layer=1, context=1, min_count=1)
        assert rebuilt.revision > built.revision
        ids, offsets = np.asarray([101, 2028, 102], np.int32), np.asarray([0, 3])
        store.lookup("p", ids, offsets, domain_revision=rebuilt.revision)
        with pytest.raises(StaleVersion):
            store.lookup("p", ids, offsets, domain_revision=built.revision)
        store.delete_domain("p")
        recreated = store.build_domain("p", "one line of text", split_layer=1, context=1, min_count=1)
        assert recreated.revision > rebuilt.revision and recreated.id != rebuilt.id
    finally:
        store.close()
