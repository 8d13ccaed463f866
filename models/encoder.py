"""An encoder base model's upper layers (BERT family) over the packed tokens of a batch that mixes tenants
and entry layers.

Holds the plain transformers BERT weights; every linear projection runs once for all active tokens
(shared weights) and each tenant's LoRA delta is added by segment (lora.py). Attention runs per sequence
via a padded view. Differentiable: trainers run the same code with their LoRA parameters.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from models.active_prefix import ActivePrefix, run_active_prefix
from models.dims import ModelDims
from models.loading import load_bert
from models.lora import LayerLoRA, LoRAWeights
from models.packing import PackedInputs


class EncoderModel:
    def __init__(self, model_dir: Path, device: torch.device) -> None:
        self.dims = ModelDims.from_dir(model_dir)
        self.model = load_bert(model_dir).to(device)
        self.device = device
        config = self.model.config
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.eps = config.layer_norm_eps
        self.act = ACT2FN[config.hidden_act]

    @torch.no_grad()
    def embed(self, token_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Embedding output (the layer-0 input) of packed tokens; LayerNorm is per token, so packing is exact."""
        embeddings = self.model.embeddings
        out = embeddings(input_ids=token_ids[None], position_ids=position_ids[None],
                         token_type_ids=torch.zeros_like(token_ids)[None])
        return out[0]

    def run(self, inputs: PackedInputs, lora: LoRAWeights) -> torch.Tensor:
        """Hidden states after the last layer for every token (the executor calls it in inference mode)."""
        layers = self.model.encoder.layer
        bounds = inputs.bounds

        def step(prefix: ActivePrefix, x: torch.Tensor) -> torch.Tensor:
            tenant_lora = LayerLoRA(lora, prefix.layer, inputs.segments.within(prefix.tokens))
            return self._layer(layers[prefix.layer], x, bounds[:prefix.sequences + 1], tenant_lora)

        return run_active_prefix(inputs.hidden, bounds, inputs.entry_layers, len(layers), step)

    def _layer(self, layer, x: torch.Tensor, bounds: list[int], lora: LayerLoRA) -> torch.Tensor:
        attention = layer.attention
        q = lora.project(x, attention.self.query, "query")
        k = lora.project(x, attention.self.key, "key")
        v = lora.project(x, attention.self.value, "value")
        context = self._attention(q, k, v, bounds)
        attn = lora.project(context, attention.output.dense, "attn_out")
        x = F.layer_norm(attn + x, (x.shape[-1],), attention.output.LayerNorm.weight,
                         attention.output.LayerNorm.bias, self.eps)
        inter = self.act(lora.project(x, layer.intermediate.dense, "ffn_in"))
        out = lora.project(inter, layer.output.dense, "ffn_out")
        return F.layer_norm(out + x, (x.shape[-1],), layer.output.LayerNorm.weight, layer.output.LayerNorm.bias,
                            self.eps)

    def _attention(self, q, k, v, bounds: list[int]) -> torch.Tensor:
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        batch, width = len(lengths), max(lengths)
        lengths_t = torch.tensor(lengths, device=q.device)
        valid = torch.arange(width, device=q.device)[None, :] < lengths_t[:, None]      # [B, W]
        flat = valid.reshape(-1).nonzero().squeeze(1)

        def padded(t):
            out = t.new_zeros(batch * width, t.shape[-1])
            out[flat] = t
            return out.view(batch, width, self.heads, self.head_dim).transpose(1, 2)

        mask = valid[:, None, None, :]
        context = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask)
        return context.transpose(1, 2).reshape(batch * width, -1)[flat]
