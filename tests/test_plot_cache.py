"""Compute's PLOT row cache against the store's own lookups, in process on a tiny random BERT: the same rows bit
for bit (a child domain over its parent, position offsets, eviction), shallow answers left to the store so
learning still sees them, a changed tree dropping what was cached, reported hits counted as the store counts
its own, and a store outage failing only the sequences the cache cannot answer."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.compute.plot_cache import PlotRowCache
from services.knowledge_store.client import lookup_request, read_lookup_stream
from services.knowledge_store.servicer import KnowledgeStoreServicer
from services.knowledge_store.store import KnowledgeStore, StoreSettings

PARENT = ["the cat sat on the mat", "the dog sat on the log", "a bird sang in the tree", "on the mat the cat sat"]
CHILD = ["the cat sang on the log", "a dog sat in the tree", "the bird sat on the mat"]
SEEN = ["the cat sat on the mat", "a dog sat in the tree", "the bird sat on the mat"]
UNSEEN = "the tree sang across a garden of cats"


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    knowledge_store = KnowledgeStore(StoreSettings(tmp_path, tiny_model_dir, "tiny", map_size=4 << 30,
                                                   default_learn_threshold=3, learn_interval=3600))
    knowledge_store.build_domain("root", "\n".join(PARENT), split_layer=2, context=2, min_count=1, no_bridge=True)
    knowledge_store.build_domain("leaf", "\n".join(CHILD), parent="root", split_layer=2, context=2, min_count=1,
                                 no_bridge=True)
    yield knowledge_store
    knowledge_store.close()


def ids(tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(tokenizer.encode(text).ids, dtype=np.int32) for text in texts]


def wire_fetch(store: KnowledgeStore, domain: str, calls: list | None = None):
    """The store's Lookup as compute reads it: the servicer's stream decoded by the client's reader."""
    servicer = KnowledgeStoreServicer(store)

    def fetch(tokens, offsets, context_tokens, known_stamp):
        if calls is not None:
            calls.append(len(offsets) - 1)
        request = lookup_request(domain, tokens, offsets)
        request.raw_rows, request.known_stamp = True, known_stamp
        if context_tokens is not None:
            request.context_tokens.extend(context_tokens.tolist())
        return read_lookup_stream(servicer.Lookup(request, None))
    return fetch


def store_rows(store, domain, pieces):
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
    _, result = store.lookup(domain, np.concatenate(pieces), offsets)
    return [result.vectors[offsets[i]:offsets[i + 1]] for i in range(len(pieces))], result


def report(store):
    return lambda domain, revision, paths, owners, counts: store.record_cached_hits(domain, revision, paths, owners,
                                                                                  counts)


@pytest.mark.parametrize("capacity_rows", [4096, 7])
def test_cached_rows_equal_the_stores_lookup_bit_for_bit(store, tokenizer, capacity_rows):
    cache = PlotRowCache(capacity_rows * 64 * 2, hidden=64, vocab=30522)
    revision = store.get_domain("leaf")["revision"]
    pieces = ids(tokenizer, SEEN + [UNSEEN])
    calls: list[int] = []
    fetch = wire_fetch(store, "leaf", calls)
    first = cache.lookup("leaf", revision, pieces, fetch)
    second = cache.lookup("leaf", revision, pieces, fetch)
    expected, _ = store_rows(store, "leaf", pieces)
    for answer in (first, second):
        assert not answer.failures
        for index, rows in enumerate(expected):
            np.testing.assert_array_equal(answer.rows[index], rows)
    assert first.cached_tokens == 0 and calls[0] == len(pieces)
    if capacity_rows > 100:
        # Every context of the corpus sentences is a node of the tree at full depth: all three from the cache;
        # the unseen sentence has shallower answers, so it goes to the store every time.
        assert second.cached_tokens == sum(len(p) for p in pieces[:3]) and calls[1] == 1
        assert cache.rows_held > 0


def test_shallow_answers_stay_with_the_store_and_are_learned(store, tokenizer):
    cache = PlotRowCache(1 << 20, hidden=64, vocab=30522)
    revision = store.get_domain("leaf")["revision"]
    unseen = ids(tokenizer, [UNSEEN])
    _, direct = store_rows(store, "leaf", unseen)
    assert direct.hit_depths.min() < 2     # the sentence has contexts the tree lacks
    store.traffic.take()
    for _ in range(3):
        answer = cache.lookup("leaf", revision, unseen, wire_fetch(store, "leaf"))
        assert answer.cached_tokens == 0
    assert store.learn_once()["materialized"] > 0     # the threshold of 3 was crossed through the cache's lookups


def test_reported_hits_are_what_the_store_would_have_counted(store, tokenizer):
    cache = PlotRowCache(1 << 20, hidden=64, vocab=30522)
    revision = store.get_domain("leaf")["revision"]
    pieces = ids(tokenizer, SEEN)
    fetch = wire_fetch(store, "leaf")
    cache.lookup("leaf", revision, pieces, fetch)
    store.traffic.take()                      # forget the first (fetched) lookup's own counts
    for _ in range(2):
        assert cache.lookup("leaf", revision, pieces, fetch).cached_tokens == sum(map(len, pieces))
    assert cache.report_once(report(store)) == 2 * sum(map(len, pieces))
    reported = store.traffic.take()[store.get_domain("leaf")["id"]].hits
    _, direct = store_rows(store, "leaf", pieces)
    assert reported == Counter({key: 2 * count for key, count in Counter(direct.hit_keys).items()})


def test_a_changed_tree_drops_the_cached_rows(store, tokenizer):
    cache = PlotRowCache(1 << 20, hidden=64, vocab=30522)
    revision = store.get_domain("leaf")["revision"]
    pieces = ids(tokenizer, SEEN)
    fetch = wire_fetch(store, "leaf")
    cache.lookup("leaf", revision, pieces, fetch)
    assert cache.lookup("leaf", revision, pieces, fetch).cached_tokens > 0
    # The parent is rebuilt from other text: the child's revision stays, its answers change.
    store.build_domain("root", "\n".join(PARENT[::-1] + ["sat sat the the cat"]), split_layer=2, context=2,
                       min_count=1, no_bridge=True)
    assert store.get_domain("leaf")["revision"] == revision
    cache.report_once(report(store))          # the store's answer carries the new stamp
    assert cache.rows_held == 0
    answer = cache.lookup("leaf", revision, pieces, fetch)
    assert answer.cached_tokens == 0
    expected, _ = store_rows(store, "leaf", pieces)
    for index, rows in enumerate(expected):
        np.testing.assert_array_equal(answer.rows[index], rows)


def test_with_the_store_down_only_uncached_sequences_fail(store, tokenizer):
    cache = PlotRowCache(1 << 20, hidden=64, vocab=30522)
    revision = store.get_domain("leaf")["revision"]
    hot = ids(tokenizer, SEEN)
    cache.lookup("leaf", revision, hot, wire_fetch(store, "leaf"))

    def down(tokens, offsets, context_tokens, known_stamp):
        raise Unavailable("the knowledge store is unreachable")
    answer = cache.lookup("leaf", revision, hot + ids(tokenizer, ["a garden of cats"]), down)
    assert sorted(answer.rows) == [0, 1, 2] and sorted(answer.failures) == [3]
    assert isinstance(answer.failures[3], Unavailable)
    expected, _ = store_rows(store, "leaf", hot)
    for index, rows in enumerate(expected):
        np.testing.assert_array_equal(answer.rows[index], rows)


@pytest.mark.parametrize("paths, owners, counts", [
    ([[5, 7, 9]], [0], [1]),          # deeper than the domain's context
    ([[-1, 5]], [0], [1]),            # no token
    ([[40000, -1]], [0], [1]),        # outside the vocabulary
    ([[5, -1]], [2], [1]),            # the chain has two links
    ([[5, -1]], [0], [0]),            # a count of zero
    ([[5, -1]], [0, 0], [1]),         # lengths disagree
])
def test_bad_reports_are_refused(store, paths, owners, counts):
    revision = store.get_domain("leaf")["revision"]
    with pytest.raises(InvalidArgument):
        store.record_cached_hits("leaf", revision, np.asarray(paths, dtype=np.int32),
                                 np.asarray(owners, dtype=np.uint8), np.asarray(counts, dtype=np.int64))


def test_a_domain_that_does_not_learn_has_every_answer_cached(store, tokenizer):
    store.build_domain("still", "\n".join(PARENT), split_layer=2, context=2, min_count=1, no_bridge=True,
                       learn_threshold=-1)
    cache = PlotRowCache(1 << 20, hidden=64, vocab=30522)
    revision = store.get_domain("still")["revision"]
    pieces = ids(tokenizer, [UNSEEN])
    fetch = wire_fetch(store, "still")
    cache.lookup("still", revision, pieces, fetch)
    answer = cache.lookup("still", revision, pieces, fetch)
    expected, direct = store_rows(store, "still", pieces)
    assert direct.hit_depths.min() < 2 and answer.cached_tokens == len(pieces[0])
    np.testing.assert_array_equal(answer.rows[0], expected[0])


def test_without_learning_only_the_missing_tokens_are_fetched(store, tokenizer):
    store.build_domain("still", "\n".join(PARENT), split_layer=2, context=2, min_count=1, no_bridge=True,
                       learn_threshold=-1)
    cache = PlotRowCache(1 << 20, hidden=64, vocab=30522)
    revision = store.get_domain("still")["revision"]
    asked = []
    servicer_fetch = wire_fetch(store, "still")

    def fetch(tokens, offsets, context_tokens, known_stamp):
        asked.append((len(tokens), None if context_tokens is None else context_tokens.tolist()))
        return servicer_fetch(tokens, offsets, context_tokens, known_stamp)
    cache.lookup("still", revision, ids(tokenizer, SEEN), fetch)
    mixed = ids(tokenizer, ["the cat sat in a garden of the tree", "the dog sat on the mat"])
    answer = cache.lookup("still", revision, mixed, fetch)
    expected, _ = store_rows(store, "still", mixed)
    for index, rows in enumerate(expected):
        np.testing.assert_array_equal(answer.rows[index], rows)
    fetched_tokens, skips = asked[-1]
    assert 0 < answer.cached_tokens < sum(map(len, mixed)) and skips is not None
    assert fetched_tokens - sum(skips) == sum(map(len, mixed)) - answer.cached_tokens
