"""Position offsets: served PLOT vectors carry no systematic error at any position of the corpus they were
built from (without offsets they do), for every depth cap; and they can be switched off."""
from __future__ import annotations

import numpy as np
import pytest

from services.knowledge_store.store import KnowledgeStore, StoreSettings
from tests.test_tree_learning import lower_output

CORPUS = ["the cat sat on the mat", "on the mat the cat sat", "a cat and a dog sat on a log",
          "the dog sat", "sat the dog on the log", "the log the mat the cat"]


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    knowledge_store = KnowledgeStore(StoreSettings(tmp_path, tiny_model_dir, "tiny", map_size=4 << 30,
                                                   default_learn_threshold=-1))
    yield knowledge_store
    knowledge_store.close()


def mean_error_per_position(store, tokenizer, model, domain, context):
    """Mean over corpus tokens at each position of (served vector - true layer-L state)."""
    sums, counts = {}, {}
    for line in CORPUS:
        ids = np.asarray(tokenizer.encode(line).ids, dtype=np.int32)
        _, result = store.lookup(domain, ids, np.asarray([0, len(ids)]), context=context)
        error = result.vectors.astype(np.float64) - lower_output(model, ids, 1).numpy()
        for position, row in enumerate(error):
            sums[position] = sums.get(position, 0) + row
            counts[position] = counts.get(position, 0) + 1
    return np.stack([sums[p] / counts[p] for p in sorted(sums)])


def test_offsets_remove_the_mean_error_at_every_position(store, tokenizer, tiny_model):
    store.build_domain("with", "\n".join(CORPUS), split_layer=1, context=2, min_count=2)
    store.build_domain("without", "\n".join(CORPUS), split_layer=1, context=2, min_count=2, position_offsets=False)
    assert store.get_domain("with")["position_offsets"] and not store.get_domain("without")["position_offsets"]
    for context in (1, 2):
        corrected = mean_error_per_position(store, tokenizer, tiny_model, "with", context)
        raw = mean_error_per_position(store, tokenizer, tiny_model, "without", context)
        assert np.abs(corrected).max() < 2e-3, f"k={context}: offsets leave a bias"   # fp16 rounding only
        assert np.abs(raw).max() > 0.05, "without offsets a position bias is expected"


def test_positions_beyond_the_table_use_its_last_row(store, tokenizer):
    store.build_domain("short", "the cat sat", split_layer=1, context=1, min_count=1)
    long_ids = np.asarray(tokenizer.encode("the cat " * 20).ids, dtype=np.int32)
    _, result = store.lookup("short", long_ids, np.asarray([0, len(long_ids)]))
    cat = int(tokenizer.token_to_id("cat"))
    rows = [result.vectors[i] for i, token in enumerate(long_ids.tolist()) if token == cat]
    np.testing.assert_array_equal(rows[-1], rows[-2])   # both past the 5 positions the corpus had
