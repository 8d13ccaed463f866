"""Independent reference: the plain transformers model with a tenant's LoRA merged into its weights."""
from __future__ import annotations

import torch

from models.adapter_format import Adapter
from models.lora_merge import merged_model


@torch.no_grad()
def reference_logits(base, adapter: Adapter, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Full model (every layer), mean pooling, head: (logits, pooled)."""
    model = merged_model(base, adapter)
    hidden = model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]
    pooled = hidden.mean(0)
    return pooled @ adapter.head_weight.T + adapter.head_bias, pooled


@torch.no_grad()
def reference_logits_from_layer(base, adapter: Adapter, layer_input: torch.Tensor, split_layer: int):
    """Feeds given layer-L vectors (e.g. PLOT rows) into the plain upper layers [L, N) with merged LoRA."""
    model = merged_model(base, adapter)
    hidden = layer_input[None].float()
    for layer in model.encoder.layer[split_layer:]:
        out = layer(hidden, attention_mask=None)  # one unpadded sequence: no mask needed
        hidden = out[0] if isinstance(out, tuple) else out
    pooled = hidden[0].mean(0)
    return pooled @ adapter.head_weight.T + adapter.head_bias, pooled


@torch.no_grad()
def reference_bridge(tensors: dict[str, torch.Tensor], heads: int, rows: torch.Tensor, eps: float = 1e-12):
    """A domain bridge (models/bridge.py) written out for one sequence from its stored tensors: position
    embedding, pre-norm attention with an explicit softmax, pre-norm feed-forward, both residual."""
    t = {name: tensor.double() for name, tensor in tensors.items()}
    x = rows.double() + t["position.weight"][:len(rows)]

    def norm(v, name):
        centred = v - v.mean(-1, keepdim=True)
        return centred / torch.sqrt((centred ** 2).mean(-1, keepdim=True) + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

    qkv = norm(x, "norm1") @ t["qkv.weight"].T + t["qkv.bias"]
    inner = qkv.shape[1] // 3
    width = inner // heads
    contexts = []
    for head in range(heads):
        q, k, v = (qkv[:, part * inner + head * width: part * inner + (head + 1) * width] for part in range(3))
        weights = torch.softmax(q @ k.T / width ** 0.5, dim=-1)
        contexts.append(weights @ v)
    x = x + torch.cat(contexts, dim=1) @ t["out.weight"].T + t["out.bias"]
    inner_ffn = torch.nn.functional.gelu(norm(x, "norm2") @ t["ffn_in.weight"].T + t["ffn_in.bias"])
    return (x + inner_ffn @ t["ffn_out.weight"].T + t["ffn_out.bias"]).float()
