"""Knowledge tree in LMDB (no model): lookup returns the vector of the deepest context path that
exists, never looking across a sequence boundary or beyond `context`; trees of different domains are
isolated, and rewriting or deleting one is transactional."""
from __future__ import annotations

import numpy as np
import pytest

from services.knowledge_store.knowledge_tree import TreeContents, lookup, write_tree
from services.knowledge_store.layout import ROWS_PER_BLOCK, StoreLayout, domain_prefix, node_key

VOCAB = 100  # > ROWS_PER_BLOCK, so vectors span several blocks
HIDDEN = 8
# deeper paths: the token, then the tokens before it, nearest first; every prefix also exists
DEEP = [(3, 2), (3, 2, 1), (3, 2, 1, 0), (5, 4), (5, 4, 3), (7, 3), (99, 98), (2, 1), (70, 3)]


def make_tree(paths: list[tuple[int, ...]], offset: float = 0.0) -> TreeContents:
    """Row i holds values unique to node i (and to `offset`), exactly representable in float16."""
    n = len(paths)
    vectors = (np.arange(n, dtype=np.float32)[:, None] * 8 + np.arange(HIDDEN)[None, :] * 0.125 + offset)
    return TreeContents(paths=list(paths), counts=np.arange(n, dtype=np.int64) + 1,
                        vectors=vectors.astype(np.float16))


BASE_PATHS = [(t,) for t in range(VOCAB)] + DEEP
BASE = make_tree(BASE_PATHS)


@pytest.fixture
def layout(tmp_path):
    store = StoreLayout(tmp_path / "db", map_size=1 << 30)
    yield store
    store.close()


def write(layout: StoreLayout, domain: int, tree: TreeContents) -> int:
    with layout.env.begin(write=True) as txn:
        return write_tree(layout, txn, domain, tree)


def run_lookup(layout: StoreLayout, domain: int, tokens: list[int], offsets: list[int], context: int = 4):
    with layout.env.begin(buffers=True) as txn:
        return lookup(layout, txn, [domain], context, HIDDEN, np.array(tokens, dtype=np.int64),
                      np.array(offsets, dtype=np.int64))


def expected(tree: TreeContents, tokens: list[int], offsets: list[int], context: int):
    """Independent reference: deepest existing path within the sequence and the context."""
    row_of = {path: i for i, path in enumerate(tree.paths)}
    vectors, depths = [], []
    for start, end in zip(offsets[:-1], offsets[1:]):
        for position in range(start, end):
            best = None
            for depth in range(1, context + 1):
                if position - depth + 1 < start:
                    break
                path = tuple(tokens[position - k] for k in range(depth))
                if path not in row_of:
                    break
                best = (row_of[path], depth)
            vectors.append(tree.vectors[best[0]])
            depths.append(best[1])
    return np.array(vectors, dtype=np.float16), np.array(depths, dtype=np.int32)


def count_keys(layout: StoreLayout, db: str, domain: int) -> int:
    prefix = domain_prefix(domain)
    with layout.env.begin() as txn:
        return sum(1 for key in txn.cursor(db=layout.db[db]).iternext(values=False) if key.startswith(prefix))


# ---- lookup ----------------------------------------------------------------------------------

def test_write_tree_stores_every_node_and_block(layout):
    written = write(layout, 1, BASE)
    assert written == BASE.vectors.nbytes
    assert count_keys(layout, "nodes", 1) == len(BASE_PATHS)
    assert count_keys(layout, "blocks", 1) == -(-len(BASE_PATHS) // ROWS_PER_BLOCK)


def test_every_token_hits_its_depth_1_node(layout):
    write(layout, 1, BASE)
    tokens = list(range(VOCAB))
    result = run_lookup(layout, 1, tokens, list(range(VOCAB + 1)))  # one token per sequence
    assert result.vectors.dtype == np.float16 and result.vectors.shape == (VOCAB, HIDDEN)
    np.testing.assert_array_equal(result.vectors, BASE.vectors[:VOCAB])
    np.testing.assert_array_equal(result.hit_depths, np.ones(VOCAB, dtype=np.int32))


def row(path: tuple[int, ...]) -> np.ndarray:
    return BASE.vectors[BASE_PATHS.index(path)]


def test_lookup_takes_the_deepest_existing_context(layout):
    write(layout, 1, BASE)
    tokens = [0, 1, 2, 3, 4, 5, 9, 3, 7, 98, 99, 3, 70]
    result = run_lookup(layout, 1, tokens, [0, len(tokens)], context=4)
    assert result.hit_depths.tolist() == [1, 1, 2, 4, 1, 3, 1, 1, 2, 1, 2, 1, 2]
    np.testing.assert_array_equal(result.vectors[3], row((3, 2, 1, 0)))
    np.testing.assert_array_equal(result.vectors[5], row((5, 4, 3)))
    np.testing.assert_array_equal(result.vectors[8], row((7, 3)))
    np.testing.assert_array_equal(result.vectors[10], row((99, 98)))  # node in the second block
    np.testing.assert_array_equal(result.vectors[12], row((70, 3)))
    np.testing.assert_array_equal(result.vectors[6], row((9,)))


@pytest.mark.parametrize("context, depths", [(1, [1, 1, 1, 1]), (2, [1, 1, 2, 2]), (3, [1, 1, 2, 3]),
                                             (8, [1, 1, 2, 4])])
def test_lookup_is_limited_to_context(layout, context, depths):
    write(layout, 1, BASE)
    tokens = [0, 1, 2, 3]
    result = run_lookup(layout, 1, tokens, [0, 4], context=context)
    assert result.hit_depths.tolist() == depths
    path = tuple(tokens[3 - k] for k in range(depths[3]))
    np.testing.assert_array_equal(result.vectors[3], row(path))


def test_lookup_does_not_see_across_sequence_boundaries(layout):
    """(3, 2) exists, but a 3 that starts a sequence must not use the 2 ending the previous one."""
    write(layout, 1, BASE)
    tokens = [1, 2, 3, 2, 3, 4, 5]
    result = run_lookup(layout, 1, tokens, [0, 2, 3, 5, 6, 7], context=4)
    assert result.hit_depths.tolist() == [1, 2, 1, 1, 2, 1, 1]
    np.testing.assert_array_equal(result.vectors[2], row((3,)))
    np.testing.assert_array_equal(result.vectors[4], row((3, 2)))
    np.testing.assert_array_equal(result.vectors[6], row((5,)))  # (5, 4) crosses a boundary


def test_lookup_matches_reference_on_random_sequences(layout):
    write(layout, 1, BASE)
    rng = np.random.default_rng(0)
    # random motifs that contain the deep paths (and their partial matches), plus random tokens
    motifs = [[0, 1, 2, 3], [1, 2, 3], [3, 4, 5], [4, 5], [3, 7], [98, 99], [3, 70], [2, 3, 7], [11], [42, 5]]
    tokens = []
    while len(tokens) < 400:
        tokens += motifs[rng.integers(len(motifs))]
    tokens = tokens[:400]
    cuts = sorted(rng.choice(np.arange(1, 400), size=30, replace=False).tolist())
    offsets = [0] + cuts + [400]
    for context in (1, 2, 3, 4):
        result = run_lookup(layout, 1, tokens, offsets, context=context)
        vectors, depths = expected(BASE, tokens, offsets, context)
        np.testing.assert_array_equal(result.hit_depths, depths)
        np.testing.assert_array_equal(result.vectors, vectors)
        assert depths.max() == context  # every depth up to the context really occurred


def test_lookup_in_a_copying_transaction_gives_the_same_result(layout):
    write(layout, 1, BASE)
    tokens = [1, 2, 3, 4, 5, 99]
    with layout.env.begin(buffers=False) as txn:
        plain = lookup(layout, txn, [1], 4, HIDDEN, np.array(tokens), np.array([0, 6]))
    buffered = run_lookup(layout, 1, tokens, [0, 6])
    np.testing.assert_array_equal(plain.vectors, buffered.vectors)
    np.testing.assert_array_equal(plain.hit_depths, buffered.hit_depths)


def test_token_without_a_node_is_an_error(layout):
    write(layout, 1, make_tree([(t,) for t in range(10)]))
    with pytest.raises(KeyError, match="token id 50"):
        run_lookup(layout, 1, [1, 50], [0, 2])


# ---- rewrite, delete, isolation --------------------------------------------------------------

def test_rewriting_a_domain_replaces_its_old_nodes(layout):
    write(layout, 1, BASE)
    shallow = make_tree([(t,) for t in range(VOCAB)], offset=1000.0)
    write(layout, 1, shallow)
    assert count_keys(layout, "nodes", 1) == VOCAB
    assert count_keys(layout, "blocks", 1) == -(-VOCAB // ROWS_PER_BLOCK)
    tokens = [0, 1, 2, 3, 99]
    result = run_lookup(layout, 1, tokens, [0, 5])
    assert result.hit_depths.tolist() == [1] * 5  # the old deep nodes are gone
    np.testing.assert_array_equal(result.vectors, shallow.vectors[tokens])


def test_rewrite_with_fewer_blocks_drops_stale_blocks(layout):
    write(layout, 1, BASE)  # 2 blocks
    write(layout, 1, make_tree([(t,) for t in range(10)]))  # 1 block
    assert count_keys(layout, "blocks", 1) == 1
    with layout.env.begin() as txn:
        assert txn.get(node_key(1, (3, 2)), db=layout.db["nodes"]) is None


def test_two_domains_do_not_interfere(layout):
    other = make_tree([(t,) for t in range(VOCAB)] + [(4, 3)], offset=-500.0)
    write(layout, 1, BASE)
    write(layout, 2, other)
    tokens = [2, 3, 4]
    one = run_lookup(layout, 1, tokens, [0, 3])
    two = run_lookup(layout, 2, tokens, [0, 3])
    assert one.hit_depths.tolist() == [1, 2, 1]
    assert two.hit_depths.tolist() == [1, 1, 2]
    np.testing.assert_array_equal(one.vectors, expected(BASE, tokens, [0, 3], 4)[0])
    np.testing.assert_array_equal(two.vectors, expected(other, tokens, [0, 3], 4)[0])
    write(layout, 1, make_tree([(t,) for t in range(VOCAB)], offset=7.0))  # rewriting 1 leaves 2 alone
    assert count_keys(layout, "nodes", 2) == VOCAB + 1
    np.testing.assert_array_equal(run_lookup(layout, 2, tokens, [0, 3]).vectors, two.vectors)


@pytest.mark.parametrize("delete", [1, 2, 256])
def test_delete_prefix_removes_only_that_domain(layout, delete):
    """Deleting the first, the last (end of the database) or a byte-adjacent domain id."""
    for domain in (1, 2, 256):
        write(layout, domain, BASE)
    with layout.env.begin(write=True) as txn:
        assert layout.delete_prefix(txn, "nodes", domain_prefix(delete)) == len(BASE_PATHS)
        assert layout.delete_prefix(txn, "blocks", domain_prefix(delete)) == 2
        assert layout.delete_prefix(txn, "nodes", domain_prefix(delete)) == 0  # nothing left
    assert count_keys(layout, "nodes", delete) == 0
    assert count_keys(layout, "blocks", delete) == 0
    for domain in {1, 2, 256} - {delete}:
        assert count_keys(layout, "nodes", domain) == len(BASE_PATHS)
        result = run_lookup(layout, domain, [1, 2, 3], [0, 3])
        np.testing.assert_array_equal(result.vectors, expected(BASE, [1, 2, 3], [0, 3], 4)[0])
    with pytest.raises(KeyError):
        run_lookup(layout, delete, [1], [0, 1])


def test_delete_prefix_of_missing_domain_removes_nothing(layout):
    write(layout, 1, BASE)
    with layout.env.begin(write=True) as txn:
        assert layout.delete_prefix(txn, "nodes", domain_prefix(9)) == 0
        assert layout.delete_prefix(txn, "nodes", domain_prefix(0)) == 0
    assert count_keys(layout, "nodes", 1) == len(BASE_PATHS)


def test_aborted_write_leaves_the_previous_tree_intact(layout):
    """write_tree runs in the caller's transaction: if the caller fails, nothing of it is visible."""
    write(layout, 1, BASE)
    tokens = [0, 1, 2, 3]
    before = run_lookup(layout, 1, tokens, [0, 4])
    with pytest.raises(RuntimeError, match="builder failed"):
        with layout.env.begin(write=True) as txn:
            write_tree(layout, txn, 1, make_tree([(t,) for t in range(VOCAB)], offset=300.0))
            raise RuntimeError("builder failed")
    after = run_lookup(layout, 1, tokens, [0, 4])
    np.testing.assert_array_equal(after.vectors, before.vectors)
    np.testing.assert_array_equal(after.hit_depths, before.hit_depths)
    assert after.hit_depths.tolist() == [1, 1, 2, 4]
    assert count_keys(layout, "nodes", 1) == len(BASE_PATHS)


def test_tree_survives_reopening_the_store(tmp_path):
    path = tmp_path / "db"
    store = StoreLayout(path, map_size=1 << 30)
    write(store, 3, BASE)
    store.close()
    reopened = StoreLayout(path, map_size=1 << 30)
    try:
        result = run_lookup(reopened, 3, [1, 2, 3], [0, 3])
        assert result.hit_depths.tolist() == [1, 2, 3]
        np.testing.assert_array_equal(result.vectors[2], row((3, 2, 1)))
    finally:
        reopened.close()
