"""PLOT for decoders: a causal lower model's layer-L state depends on the left context only, which is
exactly what a context path keys; window lookups (what generation sends) equal full-text lookups."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.loading import decoder_base, load_causal_lm, load_tokenizer
from services.knowledge_store.store import KnowledgeStore, StoreSettings
from tests.helpers import tiny_decoder

LINES = ["the quick brown fox jumps over the lazy dog near the river bank",
         "a storm is coming from the west and the sky turns dark",
         "she sells sea shells on the shore every summer morning"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder_store(request, tmp_path_factory):
    model_dir = tiny_decoder(request.param, tmp_path_factory.mktemp(f"plot-{request.param}"))
    store = KnowledgeStore(StoreSettings(tmp_path_factory.mktemp("store"), model_dir, "tiny", map_size=4 << 30,
                                         default_learn_threshold=-1))
    yield model_dir, store
    store.close()


def layer_states(model_dir, ids: list[int], layer: int) -> torch.Tensor:
    base = decoder_base(load_causal_lm(model_dir))
    with torch.no_grad():
        out = base(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer][0]


def test_deep_contexts_of_a_corpus_line_give_its_exact_layer_states(decoder_store):
    model_dir, store = decoder_store
    store.build_domain("exact", "\n".join(LINES), split_layer=2, context=16, min_count=1)
    ids = load_tokenizer(model_dir).encode(LINES[0]).ids[:16]
    _, result = store.lookup("exact", np.asarray(ids), np.array([0, len(ids)]))
    expected = layer_states(model_dir, ids, 2).numpy()
    # Every prefix of two or more tokens is a unique path: its node is the state itself (fp16). (The first
    # token's only path is the token alone, whose node averages its occurrences anywhere in the corpus.)
    np.testing.assert_allclose(result.vectors[1:].astype(np.float32), expected[1:], atol=2e-2, rtol=2e-2)


def test_window_lookups_equal_full_text_lookups(decoder_store):
    model_dir, store = decoder_store
    store.build_domain("windows", "\n".join(LINES * 3), split_layer=1, context=3, min_count=1)
    assert store.get_domain("windows")["position_offsets"]
    ids = np.asarray(load_tokenizer(model_dir).encode(LINES[1] + " " + LINES[2]).ids)
    _, full = store.lookup("windows", ids, np.array([0, len(ids)]))
    # What a generating sequence sends per step: its last tokens, the position of the first one, and how
    # many of them are context only.
    windows, firsts, skips = [], [], []
    for end in (5, 11, len(ids)):
        start = max(0, end - 4)
        windows.append(ids[start:end])
        firsts.append(start)
        skips.append(end - start - 1)
    offsets = np.concatenate([[0], np.cumsum([len(w) for w in windows])])
    _, windowed = store.lookup("windows", np.concatenate(windows), offsets, first_positions=np.array(firsts),
                               context_tokens=np.array(skips))
    assert windowed.vectors.shape == (3, full.vectors.shape[1])
    np.testing.assert_array_equal(windowed.vectors, full.vectors[[4, 10, len(ids) - 1]])
    _, unpositioned = store.lookup("windows", np.concatenate(windows), offsets, context_tokens=np.array(skips))
    assert not np.array_equal(unpositioned.vectors, windowed.vectors), "positions must reach the offsets"
