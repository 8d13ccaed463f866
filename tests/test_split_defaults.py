"""The defaults a domain and its tenants get when their builders name none: one place, read by the store, the
trainer, the CLI and the benchmark."""
from __future__ import annotations

from models.adapter_format import DEFAULT_TARGETS, random_adapter
from models.dims import ModelDims
from models.split_defaults import ENCODER_PROJECTIONS, default_split, tenant_targets

MINILM = ModelDims(family="bert", hidden=384, intermediate=1536, layers=6, heads=12, vocab=30522, max_positions=512)
SMOLLM = ModelDims(family="llama", hidden=576, intermediate=1536, layers=30, heads=9, vocab=49152,
                   max_positions=8192, kv_heads=3)


def test_encoders_split_at_half_with_a_bridge_and_decoders_do_not_split():
    encoder, decoder = default_split(MINILM), default_split(SMOLLM)
    assert (encoder.split_layer, encoder.context, encoder.bridge) == (3, 2, True)
    assert (decoder.split_layer, decoder.bridge) == (0, False)
    assert "points below" in encoder.describe() and "split layer 3" in encoder.describe()


def test_tenants_above_a_split_adapt_every_projection_of_the_computed_layers():
    assert tenant_targets(MINILM, 3) == ENCODER_PROJECTIONS
    assert tenant_targets(MINILM, 0) == DEFAULT_TARGETS
    assert tenant_targets(SMOLLM, 4) == DEFAULT_TARGETS
    # Every projection named is one an encoder adapter may hold.
    adapter = random_adapter(MINILM, num_labels=2, rank=2, first_layer=3, targets=tenant_targets(MINILM, 3), seed=0)
    assert {target for _, target in adapter.lora} == set(ENCODER_PROJECTIONS)
    assert {layer for layer, _ in adapter.lora} == {3, 4, 5}
