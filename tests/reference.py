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
