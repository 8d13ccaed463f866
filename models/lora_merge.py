"""A tenant's LoRA merged into a copy of the plain transformers model (W += alpha/r · B·A).

What a user would deploy without HMI (one model per tenant); the tests' independent reference and the
benchmark's naive system both start from it. Not used on the serving path. Where each target's weight lives
(and how a fused projection is sliced) is the model family's (models/families).
"""
from __future__ import annotations

import copy

import torch

from models.adapter_format import Adapter
from models.dims import ModelDims
from models.families import QKV, family, resolve


def merged_model(base, adapter: Adapter):
    """A copy of `base` (BertModel, GPT2LMHeadModel, LlamaForCausalLM, ...) with the adapter's LoRA merged."""
    model = copy.deepcopy(base)
    found = family(model.config.model_type)
    dims = ModelDims.from_config(model.config)
    widths = {"query": dims.heads * dims.head_dim, "key": dims.kv_heads * dims.head_dim,
              "value": dims.kv_heads * dims.head_dim}
    layers = resolve(model, found.layers_path)
    with torch.no_grad():
        for (layer, target), (a, b) in adapter.lora.items():
            delta = adapter.scaling * (b @ a)                     # [out, in]
            weight = resolve(layers[layer], found.module_of(target)).weight
            if found.transposed:                                  # stored [in, out]
                weight, delta = weight.T, delta
            if target in QKV and found.fused_qkv:                 # a slice of the fused projection's outputs
                start = sum(widths[t] for t in QKV[:QKV.index(target)])
                weight = weight[start:start + widths[target]]
            weight += delta
    return model.eval()
