"""Domain-adapted lower models: MLM continued pretraining changes only layers [0, L), lowers the held-out
masked-token loss on the domain, and the PLOT is then built from the adapted layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lower import lower_model
from services.common.errors import InvalidArgument
from services.knowledge_store.domain_adaptation import AdaptSettings, with_lower_layers
from services.knowledge_store.store import KnowledgeStore, StoreSettings

DOMAIN = ["the patient was given aspirin for the pain", "the patient was given insulin for diabetes",
          "the doctor gave the patient aspirin", "the nurse gave the patient insulin"]


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    knowledge_store = KnowledgeStore(StoreSettings(tmp_path, tiny_model_dir, "tiny", map_size=4 << 30))
    yield knowledge_store
    knowledge_store.close()


def outputs(model, ids, split_layer):
    with torch.inference_mode():
        tensor = torch.as_tensor(ids, dtype=torch.long)[None]
        return lower_model(model, split_layer)(input_ids=tensor, token_type_ids=torch.zeros_like(tensor)
                                               ).last_hidden_state[0].numpy()


def test_adapted_lower_layers_fit_the_domain_and_feed_the_plot(store, tokenizer, tiny_model):
    corpus = "\n".join(DOMAIN * 20)
    record = store.adapt_domain("clinic", corpus, split_layer=2,
                                settings=AdaptSettings(2, steps=60, batch_size=8, learning_rate=1e-3, seed=1))
    assert record["lower_model"] == "adapted"
    report = record["adapt"]
    assert report["steps"] == 60 and report["adapted_loss"] < report["base_loss"] - 0.1, report

    with store.layout.env.begin() as txn:
        weights = bytes(txn.get(b"clinic", db=store.layout.db["lower"]))
    adapted = with_lower_layers(tiny_model, weights)
    # Only the lower layers changed, and the base model the store shares is untouched.
    assert adapted.encoder.layer[2] is tiny_model.encoder.layer[2]
    assert not torch.equal(adapted.encoder.layer[0].attention.self.query.weight,
                           tiny_model.encoder.layer[0].attention.self.query.weight)

    sentence = DOMAIN[0]
    ids = np.asarray(tokenizer.encode(sentence).ids, dtype=np.int32)
    store.build_domain("clinic", sentence, split_layer=2, context=len(ids), min_count=1)
    assert store.get_domain("clinic")["lower_model"] == "adapted"
    _, result = store.lookup("clinic", ids, np.asarray([0, len(ids)]))
    expected = outputs(adapted, ids, 2).astype(np.float16)
    np.testing.assert_array_equal(result.vectors, expected)
    assert not np.allclose(result.vectors, outputs(tiny_model, ids, 2).astype(np.float16), atol=1e-2)


def test_adapting_checks_its_input(store):
    with pytest.raises(InvalidArgument, match="split layer"):
        store.adapt_domain("x", "a\nb\nc", split_layer=0)
    with pytest.raises(InvalidArgument, match="at least 2"):
        store.adapt_domain("x", "only one line", split_layer=1, settings=AdaptSettings(1, steps=2))
    with pytest.raises(InvalidArgument, match="steps"):
        store.adapt_domain("x", "a\nb", split_layer=1, settings=AdaptSettings(1, steps=0))
    store.adapt_domain("y", "\n".join(DOMAIN), split_layer=1, settings=AdaptSettings(1, steps=2, batch_size=2))
    with pytest.raises(InvalidArgument, match="adapted for split layer 1"):
        store.build_domain("y", "\n".join(DOMAIN), split_layer=2, context=2, min_count=1)
