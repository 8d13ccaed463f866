"""The grouped multi-adapter LoRA (the CPU path for many short segments) is exact: it equals the per-segment
reference on any segment layout, and a mixed batch of many tenants with every-projection adapters through the
upper layers gives each tenant the logits of the plain transformers model with its LoRA merged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hmi_kernels import lora as kernels
from hmi_kernels.lora import find_segments, sgmv, sgmv_grouped, sgmv_reference
from models.adapter_format import random_adapter
from models.dims import ModelDims
from models.encoder import EncoderModel
from models.lora import LoRAWeights
from models.packing import PackedLayout, pack_inputs
from models.split_defaults import ENCODER_PROJECTIONS
from tests.reference import reference_logits


def _layout(lengths: list[int], slots: list[int]):
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return find_segments([s for s, n in zip(slots, lengths) for _ in range(n)], bounds), bounds[-1]


@pytest.mark.parametrize("lengths, slots", [
    ([5, 3, 7], [2, 0, 1]),
    ([1] * 20, [i % 7 for i in range(20)]),                 # decode: one token per sequence
    ([4, 2, 6, 3], [-1, 3, 1, -1]),                          # tokens without an adapter stay as they are
    ([2, 2, 2, 2, 9], [1, 1, 4, 4, 0]),                      # merged segments of unequal length
])
def test_grouped_equals_the_reference_with_padded_ranks(lengths, slots):
    generator = torch.Generator().manual_seed(len(lengths))
    segments, tokens = _layout(lengths, slots)
    slot_count, max_rank, used, width_in, width_out = 8, 8, 3, 12, 10
    lora_a = torch.zeros(slot_count, max_rank, width_in)
    lora_b = torch.zeros(slot_count, width_out, max_rank)
    lora_a[:, :used] = torch.randn(slot_count, used, width_in, generator=generator)
    lora_b[:, :, :used] = torch.randn(slot_count, width_out, used, generator=generator)
    ranks = torch.full((slot_count,), used, dtype=torch.int32)
    x = torch.randn(tokens, width_in, generator=generator)
    base = torch.randn(tokens, width_out, generator=generator)
    expected = sgmv_reference(base.clone(), x, segments, lora_a, lora_b)
    got = sgmv_grouped(base.clone(), x, segments, lora_a, lora_b, ranks)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    untouched = [t for t in range(tokens) if all(not (s <= t < e) or slot < 0
                                                 for s, e, slot in zip(segments.starts, segments.ends, segments.slots))]
    assert torch.equal(got[untouched], base[untouched])
    assert not torch.allclose(got, base)           # the deltas were really added


def test_sgmv_takes_the_grouped_form_for_many_one_token_segments(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "sgmv_grouped", lambda *args: calls.append("grouped") or args[0])
    monkeypatch.setattr(kernels, "sgmv_reference", lambda *args: calls.append("loop") or args[0])
    x, out = torch.zeros(16, 4), torch.zeros(16, 4)
    a, b = torch.zeros(16, 2, 4), torch.zeros(16, 4, 2)
    sgmv(out, x, _layout([1] * 16, list(range(16)))[0], a, b)
    sgmv(out, x, _layout([8, 8], [0, 1])[0], a, b)
    assert calls == ["grouped", "loop"]


@pytest.mark.parametrize("length", [1, 6])
def test_mixed_batch_of_many_every_projection_tenants_equals_merged_transformers(tiny_model_dir, tiny_model, length,
                                                                                monkeypatch):
    """Twelve tenants in one packed batch from the embeddings (L = 0), every projection adapted, ranks padded to the
    pool's maximum; the grouped path (forced for every segment length) and the loop give the merged model's logits."""
    dims = ModelDims.from_dir(tiny_model_dir)
    model = EncoderModel(tiny_model_dir, torch.device("cpu"))
    tenants = 12
    adapters = [random_adapter(dims, num_labels=3, rank=2 + i % 3, first_layer=0, targets=ENCODER_PROJECTIONS, seed=i)
                for i in range(tenants)]
    max_rank = 8
    keys = list(adapters[0].lora)
    a, b = {}, {}
    for key in keys:
        a[key] = torch.zeros(tenants, max_rank, adapters[0].lora[key][0].shape[1])
        b[key] = torch.zeros(tenants, adapters[0].lora[key][1].shape[0], max_rank)
        for slot, adapter in enumerate(adapters):
            lora_a, lora_b = adapter.lora[key]
            a[key][slot, :adapter.rank] = lora_a
            b[key][slot, :, :adapter.rank] = lora_b * adapter.scaling
    ranks = torch.tensor([adapter.rank for adapter in adapters], dtype=torch.int32)
    rng = np.random.default_rng(length)
    sequences = [rng.integers(1000, 2000, size=length + i % 3).astype(np.int32) for i in range(2 * tenants)]
    slots = [i % tenants for i in range(len(sequences))]
    layout = PackedLayout.of([0] * len(sequences), slots, [len(s) for s in sequences])
    for grouped_limit in (0, 1_000):     # 0: the loop everywhere; 1000: the grouped form everywhere
        monkeypatch.setattr(kernels, "GROUPED_MAX_MEAN_TOKENS", grouped_limit)
        monkeypatch.setattr(kernels, "GROUPED_MIN_SEGMENTS", 2)
        with torch.inference_mode():
            inputs = pack_inputs(layout, hidden_size=dims.hidden, device=torch.device("cpu"), embed=model.embed,
                                 token_ids_of=lambda j: sequences[layout.order[j]], first_position_of=lambda j: 0,
                                 plot=None)
            hidden = model.run(inputs, LoRAWeights(a, b, ranks))
        for j, index in enumerate(layout.order):
            adapter = adapters[slots[index]]
            pooled = hidden[layout.bounds[j]:layout.bounds[j + 1]].mean(0)
            logits = pooled @ adapter.head_weight.T + adapter.head_bias
            expected, _ = reference_logits(tiny_model, adapter, sequences[index].tolist())
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
