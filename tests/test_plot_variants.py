"""The study's both-sided window lookup (bench/plot_variants.py): exact on its own corpus, backs off to
narrower windows, and falls back to the token alone; checked against plain transformers hidden states."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.plot_variants import WindowPlot, window_shapes
from services.knowledge_store.plot_builder import PlotBuilder

SPLIT = 2


@pytest.fixture(scope="module")
def builder(tiny_model, tokenizer):
    return PlotBuilder(tiny_model, tokenizer, tiny_model.config.vocab_size)


def layer_states(model, ids: list[int]) -> np.ndarray:
    """Layer-L output of the whole sequence from transformers itself (the independent reference)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    token_type_ids=torch.zeros(1, len(ids), dtype=torch.long), output_hidden_states=True)
    return out.hidden_states[SPLIT][0].float().numpy()


def test_window_shapes_back_off_right_side_first():
    assert window_shapes(1) == [(1, 1), (1, 0), (0, 0)]
    assert window_shapes(2) == [(2, 2), (2, 1), (1, 1), (1, 0), (0, 0)]


def test_one_sentence_corpus_gives_the_lower_models_output_for_each_window(builder, tiny_model):
    sentence = "the quiet river bends"
    plot = WindowPlot(builder, SPLIT, radius=1, min_count=1, position_offsets=False).build([sentence])
    ids = builder.tokenize([sentence], 128)[0]
    served = plot.lookup("d", [np.asarray(ids)])[0].astype(np.float32)
    np.testing.assert_allclose(served, layer_states(tiny_model, ids), atol=2e-2, rtol=2e-2)


def test_unseen_windows_back_off_to_narrower_ones_then_to_the_token_alone(builder, tiny_model):
    corpus = "the quiet river bends"
    plot = WindowPlot(builder, SPLIT, radius=1, min_count=1, position_offsets=False).build([corpus])
    known = builder.tokenize([corpus], 128)[0]
    truth = layer_states(tiny_model, known)
    # The same sentence with its last word changed: "quiet" keeps its (1, 1) window, "river" loses its
    # right neighbour and backs off to (left, token), the new word was never seen at all.
    query = builder.tokenize(["the quiet river sings"], 128)[0]
    # [CLS] the quiet river <word> [SEP]
    assert query[:4] == known[:4] and query[4] != known[4]
    served = plot.lookup("d", [np.asarray(query)])[0].astype(np.float32)
    np.testing.assert_allclose(served[2], truth[2], atol=2e-2, rtol=2e-2)      # "quiet": same (1, 1) window
    assert (known[2], known[3], known[4]) in plot.tables[(1, 1)]
    assert (query[2], query[3], query[4]) not in plot.tables[(1, 1)]
    river = plot.tables[(1, 0)][(known[2], known[3])].astype(np.float32)
    np.testing.assert_allclose(served[3], river, atol=1e-3)                     # backed off to (1, 0)
    np.testing.assert_allclose(served[3], truth[3], atol=2e-2, rtol=2e-2)
    alone = builder.isolated_vectors(SPLIT, lambda *a: None)[query[4]].float().numpy()
    np.testing.assert_allclose(served[4], alone, atol=1e-2, rtol=1e-2)          # never seen: the token alone
    assert not np.allclose(served[4], truth[4], atol=2e-2)                       # (and not the old word's state)
