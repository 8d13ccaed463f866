"""The base model's upper layers, run on packed tokens of a batch that mixes tenants and entry layers.

Holds the plain transformers BERT weights; computes every linear projection once for all active
tokens (shared weights) and adds each tenant's LoRA delta by segment. Attention runs per sequence via
a padded view. Sequences are ordered by entry layer, so the tokens active at layer i are a prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from kernels.lora import Segments, sgmv
from services.common.models import ModelDims, load_bert


@dataclass
class LayerInputs:
    """Per-batch structure shared by every layer: computed once (find_segments, padding maps)."""
    hidden: torch.Tensor            # [tokens, H], fp32, ordered by entry layer
    seq_bounds: list[int]           # n+1 offsets in execution order
    entry_layers: list[int]         # per sequence, non-decreasing
    segments: Segments              # tenant segments over tokens
    slot_ranks: torch.Tensor | None = None   # adapter rank per pool slot (device): enables the CUDA kernels


class UpperModel:
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

    def run(self, inputs: LayerInputs, lora_a: dict, lora_b: dict) -> torch.Tensor:
        """Differentiable (the trainer uses it with LoRA parameters); the executor calls it in inference mode."""
        hidden = inputs.hidden
        bounds = inputs.seq_bounds
        for index, layer in enumerate(self.model.encoder.layer):
            active_seqs = sum(1 for entry in inputs.entry_layers if entry <= index)
            if active_seqs == 0:
                continue
            active = bounds[active_seqs]
            segments = inputs.segments.within(active)
            updated = self._layer(index, layer, hidden[:active], bounds[:active_seqs + 1], segments, lora_a, lora_b,
                                  inputs.slot_ranks)
            # Out of place: autograd keeps each layer's input for the backward pass.
            hidden = updated if active == len(hidden) else torch.cat([updated, hidden[active:]])
        return hidden

    def _project(self, x, linear, layer_index, target, segments, lora_a, lora_b, slot_ranks):
        out = F.linear(x, linear.weight, linear.bias)
        key = (layer_index, target)
        if key in lora_a:
            sgmv(out, x, segments, lora_a[key], lora_b[key], slot_ranks)
        return out

    def _layer(self, index, layer, x, bounds, segments, lora_a, lora_b, slot_ranks=None) -> torch.Tensor:
        attention = layer.attention
        proj = lambda inp, lin, target: self._project(inp, lin, index, target, segments, lora_a, lora_b,  # noqa: E731
                                                      slot_ranks)
        q = proj(x, attention.self.query, "query")
        k = proj(x, attention.self.key, "key")
        v = proj(x, attention.self.value, "value")
        context = self._attention(q, k, v, bounds)
        attn = proj(context, attention.output.dense, "attn_out")
        x = F.layer_norm(attn + x, (x.shape[-1],), attention.output.LayerNorm.weight,
                         attention.output.LayerNorm.bias, self.eps)
        inter = self.act(proj(x, layer.intermediate.dense, "ffn_in"))
        out = proj(inter, layer.output.dense, "ffn_out")
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
