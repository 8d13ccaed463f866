"""Llama (SmolLM2 and the like): separate projections with grouped-query attention, rotary positions applied
to queries and keys inside every layer (so a PLOT vector needs no position), a gated MLP (gate_proj)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from models.families import Family

if TYPE_CHECKING:     # torch only where a block runs: the PEFT conversion reads families without it
    import torch


def dims(config) -> dict:
    heads = config.num_attention_heads
    return {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers, "heads": heads, "vocab": config.vocab_size,
            "max_positions": config.max_position_embeddings,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


def embed(base, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return base.embed_tokens(token_ids)


def block(decoder, lora, block, x, bounds, kv, positions) -> torch.Tensor:
    attention, mlp = block.self_attn, block.mlp
    h = block.input_layernorm(x)
    q = lora.project(h, attention.q_proj, "query")
    k = lora.project(h, attention.k_proj, "key")
    v = lora.project(h, attention.v_proj, "value")
    q, k = decoder.rotate(q, k, positions)
    context = decoder.attention(lora.layer, q, k, v, bounds, kv)
    x = x + lora.project(context, attention.o_proj, "attn_out")
    h = block.post_attention_layernorm(x)
    inter = decoder.act(lora.project(h, mlp.gate_proj, "ffn_gate")) * lora.project(h, mlp.up_proj, "ffn_in")
    return x + lora.project(inter, mlp.down_proj, "ffn_out")


FAMILY = Family(
    name="llama", decoder=True, dims=dims, layers_path="model.layers", peft_marker="layers.",
    modules={"self_attn.q_proj": "query", "self_attn.k_proj": "key", "self_attn.v_proj": "value",
             "self_attn.o_proj": "attn_out", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_in",
             "mlp.down_proj": "ffn_out"},
    base="model", blocks="layers", final_norm="norm",
    hooks={"embed": embed, "block": block, "activation": lambda config: config.hidden_act})
