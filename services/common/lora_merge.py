"""A tenant's LoRA merged into a copy of the plain transformers BERT (W += alpha/r · B·A).

What a user would deploy without HMI (one model per tenant); the tests' independent reference and the
benchmark's naive system both start from it. Not used on the serving path.
"""
from __future__ import annotations

import copy

import torch

from services.common.adapter_format import Adapter

MODULES = {
    "query": lambda layer: layer.attention.self.query,
    "key": lambda layer: layer.attention.self.key,
    "value": lambda layer: layer.attention.self.value,
    "attn_out": lambda layer: layer.attention.output.dense,
    "ffn_in": lambda layer: layer.intermediate.dense,
    "ffn_out": lambda layer: layer.output.dense,
}


def merged_model(base, adapter: Adapter):
    model = copy.deepcopy(base)
    with torch.no_grad():
        for (layer, target), (a, b) in adapter.lora.items():
            linear = MODULES[target](model.encoder.layer[layer])
            linear.weight += adapter.scaling * (b @ a)
    return model.eval()
