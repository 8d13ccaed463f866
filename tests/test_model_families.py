"""Every model family's declaration (models/families) against a real transformers model of that family: each
LoRA target's module exists where the family says, with the shape HMI's adapter format expects of it (a fused
projection holding query, key and value in that order, transposed weights where the family says so), and the
decoder wiring (base, blocks, final norm) resolves. The families' exactness against transformers is tested
end to end in test_lora_reference.py and test_serving_exact.py."""
from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from models.adapter_format import TARGETS, target_shape
from models.dims import ModelDims
from models.families import QKV, all_families, family, resolve
from services.common.errors import InvalidArgument

TINY = {
    "bert": lambda: BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, max_position_embeddings=16), add_pooling_layer=False),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=48, max_position_embeddings=16)),
}


def test_every_family_has_a_tiny_model_here():
    assert set(all_families()) == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_targets_module_sits_where_the_family_says_with_the_shape_adapters_have(name):
    model = TINY[name]()
    declared = family(name)
    dims = ModelDims.from_config(model.config)
    assert dims.family == name and dims.is_decoder == declared.decoder
    layers = resolve(model, declared.layers_path)
    assert len(layers) == dims.layers
    assert set(declared.targets) <= set(TARGETS)
    for target in declared.targets:
        weight = resolve(layers[0], declared.module_of(target)).weight
        out_features, in_features = weight.T.shape if declared.transposed else weight.shape
        fan_in, fan_out = target_shape(target, dims)
        assert in_features == fan_in, (target, weight.shape)
        if target in QKV and declared.fused_qkv:
            widths = [target_shape(t, dims)[1] for t in QKV]
            assert out_features == sum(widths)
        else:
            assert out_features == fan_out, (target, weight.shape)
    if declared.decoder:
        base = getattr(model, declared.base)
        assert len(getattr(base, declared.blocks)) == dims.layers
        assert isinstance(getattr(base, declared.final_norm), torch.nn.Module)
        embedded = declared.hooks["embed"](base, torch.tensor([1, 2]), torch.tensor([0, 1]))
        assert embedded.shape == (2, dims.hidden)


def test_an_unknown_family_or_target_is_refused_with_what_exists():
    with pytest.raises(InvalidArgument, match="bert"):
        family("t5")
    with pytest.raises(InvalidArgument, match="ffn_gate"):
        family("gpt2").module_of("ffn_gate")
