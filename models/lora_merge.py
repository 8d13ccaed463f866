"""A tenant's LoRA merged into a copy of the plain transformers model (W += alpha/r · B·A).

What a user would deploy without HMI (one model per tenant); the tests' independent reference and the
benchmark's naive system both start from it. Not used on the serving path.
"""
from __future__ import annotations

import copy

import torch

from models.adapter_format import Adapter

BERT_MODULES = {
    "query": lambda layer: layer.attention.self.query,
    "key": lambda layer: layer.attention.self.key,
    "value": lambda layer: layer.attention.self.value,
    "attn_out": lambda layer: layer.attention.output.dense,
    "ffn_in": lambda layer: layer.intermediate.dense,
    "ffn_out": lambda layer: layer.output.dense,
}
LLAMA_MODULES = {
    "query": lambda layer: layer.self_attn.q_proj,
    "key": lambda layer: layer.self_attn.k_proj,
    "value": lambda layer: layer.self_attn.v_proj,
    "attn_out": lambda layer: layer.self_attn.o_proj,
    "ffn_in": lambda layer: layer.mlp.up_proj,
    "ffn_gate": lambda layer: layer.mlp.gate_proj,
    "ffn_out": lambda layer: layer.mlp.down_proj,
}
GPT2_QKV = {"query": 0, "key": 1, "value": 2}   # slices of the fused c_attn (a Conv1D: weight is [in, out])
GPT2_MODULES = {
    "attn_out": lambda block: block.attn.c_proj,
    "ffn_in": lambda block: block.mlp.c_fc,
    "ffn_out": lambda block: block.mlp.c_proj,
}


def merged_model(base, adapter: Adapter):
    """A copy of `base` (BertModel, GPT2LMHeadModel or LlamaForCausalLM) with the adapter's LoRA merged."""
    model = copy.deepcopy(base)
    kind = model.config.model_type
    with torch.no_grad():
        for (layer, target), (a, b) in adapter.lora.items():
            delta = adapter.scaling * (b @ a)                     # [out, in]
            if kind == "bert":
                BERT_MODULES[target](model.encoder.layer[layer]).weight += delta
            elif kind == "llama":
                LLAMA_MODULES[target](model.model.layers[layer]).weight += delta
            elif kind == "gpt2":
                block = model.transformer.h[layer]
                if target in GPT2_QKV:
                    width = model.config.n_embd
                    start = GPT2_QKV[target] * width
                    block.attn.c_attn.weight[:, start:start + width] += delta.T
                else:
                    GPT2_MODULES[target](block).weight += delta.T
            else:
                raise ValueError(f"no LoRA merge for model type {kind!r}")
    return model.eval()
