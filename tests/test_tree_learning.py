"""Frequency-managed knowledge trees, in process on a tiny random BERT: traffic counting, materialisation
at the threshold, pruning to the budget, parent fallback, and no torn reads while the tree changes."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.lower import lower_model
from services.common.errors import FailedPrecondition, InvalidArgument
from services.knowledge_store.store import KnowledgeStore, StoreSettings

CORPUS = ["the cat sat on the mat", "the dog sat on the log", "a bird sang in the tree"]
SENTENCE = "the cat chased a small bird across the garden"
HIDDEN = 64


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    settings = StoreSettings(tmp_path, tiny_model_dir, "tiny", map_size=4 << 30, default_learn_threshold=3,
                             learn_interval=3600)
    knowledge_store = KnowledgeStore(settings)
    yield knowledge_store
    knowledge_store.close()


def ids_of(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text).ids, dtype=np.int32)


def look(store, domain, ids):
    return store.lookup(domain, ids, np.asarray([0, len(ids)]))


def lower_output(model, ids, split_layer: int) -> torch.Tensor:
    with torch.inference_mode():
        tensor = torch.as_tensor(ids, dtype=torch.long)[None]
        return lower_model(model, split_layer)(input_ids=tensor, token_type_ids=torch.zeros_like(tensor)
                                               ).last_hidden_state[0]


def test_missing_contexts_are_counted_then_materialised_at_the_threshold(store, tokenizer, tiny_model):
    store.build_domain("d", "\n".join(CORPUS), split_layer=2, context=3, min_count=1, learn_threshold=3)
    ids = ids_of(tokenizer, SENTENCE)
    _, before = look(store, "d", ids)
    assert len(before.misses) > 0
    look(store, "d", ids)
    assert store.learn_once()["materialized"] == 0          # 2 lookups < threshold 3
    counted = store.get_domain("d")["traffic_entries"]
    assert counted == len({miss.path for miss in before.misses})

    look(store, "d", ids)
    summary = store.learn_once()
    assert summary["materialized"] == counted                # the 3rd lookup crossed the threshold
    record = store.get_domain("d")
    assert record["materialized"] == counted and record["traffic_entries"] == 0
    assert record["nodes"] == sum(record["nodes_per_depth"])

    _, after = look(store, "d", ids)
    deeper = after.hit_depths > before.hit_depths
    assert deeper.sum() == counted
    # A materialised node holds the domain's lower model at that token over the contexts seen (here: this
    # sentence), less the position offset the lookup adds back: served = the true state, to fp16 rounding.
    reference = lower_output(tiny_model, ids, 2).numpy()
    np.testing.assert_allclose(after.vectors[deeper].astype(np.float32), reference[deeper], rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(after.vectors[~deeper], before.vectors[~deeper])
    # Growth continues a level deeper on later traffic, never skipping a level.
    for _ in range(3):
        look(store, "d", ids)
    store.learn_once()
    _, third = look(store, "d", ids)
    assert (third.hit_depths - before.hit_depths).max() <= 2 and third.hit_depths.max() <= 3


def test_learning_can_be_switched_off_per_domain(store, tokenizer):
    store.build_domain("quiet", "\n".join(CORPUS), split_layer=2, context=3, min_count=1, learn_threshold=-1)
    ids = ids_of(tokenizer, SENTENCE)
    for _ in range(5):
        look(store, "quiet", ids)
    assert store.learn_once()["materialized"] == 0
    assert store.get_domain("quiet")["traffic_entries"] == 0
    assert sum(store.get_domain("quiet")["recent_hit_depths"]) == 5 * len(ids)


def test_build_and_growth_stay_within_the_budget_pruning_the_coldest_leaves(store, tokenizer):
    vocabulary_bytes = 30522 * HIDDEN * 2
    budget = vocabulary_bytes + 10 * HIDDEN * 2            # room for 10 deeper nodes
    corpus = CORPUS * 3 + ["the cat sat on the mat"] * 5   # make some contexts much hotter than others
    record = store.build_domain("small", "\n".join(corpus), split_layer=1, context=3, min_count=1,
                                budget_bytes=budget, learn_threshold=2)
    assert record["plot_bytes"] <= budget and record["pruned"] > 0
    assert record["nodes_per_depth"][0] == 30522           # a root keeps every depth-1 node
    hot = look(store, "small", ids_of(tokenizer, "the cat sat on the mat"))[1]
    cold = look(store, "small", ids_of(tokenizer, "a bird sang in the tree"))[1]
    assert hot.hit_depths.mean() > cold.hit_depths.mean()  # the hottest sentence kept its deep contexts

    rows_after_build = store.get_domain("small")["rows"]
    ids = ids_of(tokenizer, SENTENCE)
    for _ in range(2):
        look(store, "small", ids)
    summary = store.learn_once()
    assert summary["materialized"] > 0 and summary["pruned"] >= summary["materialized"]
    record = store.get_domain("small")
    assert record["plot_bytes"] <= budget and record["nodes"] == 30522 + 10
    # Rows freed by pruning are reused: growth within the budget allocates no new rows.
    assert record["rows"] == rows_after_build
    # The tree stays consistent: every token still finds a node.
    assert look(store, "small", ids)[1].hit_depths.min() >= 1


def test_a_budget_smaller_than_the_vocabulary_is_refused(store):
    with pytest.raises(InvalidArgument, match="depth-1 rows"):
        store.build_domain("tiny-budget", "a b c", split_layer=1, context=2, min_count=1, budget_bytes=1 << 20)


def test_child_domain_stores_only_what_it_adds_and_falls_back_to_its_parent(store, tokenizer, tiny_model):
    store.build_domain("general-text", "\n".join(CORPUS), split_layer=2, context=2, min_count=1)
    child_corpus = "the garden bird sang"
    child = store.build_domain("gardens", child_corpus, parent="general-text", split_layer=2, context=2,
                               min_count=1)
    child_ids = ids_of(tokenizer, child_corpus)
    assert child["nodes_per_depth"][0] == len(set(child_ids.tolist()))   # not the whole vocabulary
    assert child["plot_bytes"] < store.get_domain("general-text")["plot_bytes"] / 100

    ids = ids_of(tokenizer, SENTENCE)
    _, from_child = look(store, "gardens", ids)
    _, from_parent = look(store, "general-text", ids)
    own = set(child_ids.tolist())
    for position, token in enumerate(ids.tolist()):
        if token not in own:   # served by the parent's node, with the parent's position offsets
            np.testing.assert_array_equal(from_child.vectors[position], from_parent.vectors[position])
        elif from_child.hit_depths[position] == 1:   # the child's own node differs from the parent's
            assert not np.array_equal(from_child.vectors[position], from_parent.vectors[position])
    # The child's own one-sentence corpus is served as its lower model computed it.
    _, itself = look(store, "gardens", child_ids)
    reference = lower_output(tiny_model, child_ids, 2).numpy()
    np.testing.assert_allclose(itself.vectors[:2].astype(np.float32), reference[:2], rtol=2e-3, atol=2e-3)
    # Depth-2 contexts the parent knows are found through the child too.
    _, parent_sentence = look(store, "gardens", ids_of(tokenizer, CORPUS[0]))
    assert parent_sentence.hit_depths.max() == 2

    with pytest.raises(InvalidArgument, match="parent's split layer"):
        store.build_domain("bad-child", "x", parent="general-text", split_layer=1, context=2, min_count=1)
    with pytest.raises(FailedPrecondition, match="parent of"):
        store.delete_domain("general-text")


def test_lookups_never_see_a_half_changed_tree(store, tokenizer):
    """Readers race a writer that rebuilds and regrows the tree; each lookup sees the state before or after."""
    store.build_domain("busy", "\n".join(CORPUS), split_layer=1, context=3, min_count=1, learn_threshold=1)
    ids = ids_of(tokenizer, SENTENCE)
    _, initial = look(store, "busy", ids)
    store.learn_once()
    _, grown = look(store, "busy", ids)
    store.learn_once()
    _, grown_more = look(store, "busy", ids)
    valid = [initial.vectors.tobytes(), grown.vectors.tobytes(), grown_more.vectors.tobytes()]
    assert len(set(valid)) >= 2   # deeper nodes over the same sentence may repeat a vector

    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                seen.append(look(store, "busy", ids)[1].vectors.tobytes())
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(4):
            store.build_domain("busy", "\n".join(CORPUS), split_layer=1, context=3, min_count=1, learn_threshold=1)
            for _ in range(3):
                look(store, "busy", ids)
                store.learn_once()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors
    assert len(seen) > 10
    assert set(seen) <= set(valid), "a lookup returned a mix of two tree states"


def test_a_domain_without_a_plot_yet_is_a_failed_precondition(store, tokenizer):
    from services.knowledge_store.domain_adaptation import AdaptSettings
    store.adapt_domain("fresh", "\n".join(CORPUS * 4), split_layer=2, settings=AdaptSettings(2, steps=2, batch_size=4))
    with pytest.raises(FailedPrecondition, match="no PLOT yet"):
        look(store, "fresh", ids_of(tokenizer, SENTENCE))
