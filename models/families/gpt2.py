"""GPT-2: one fused query-key-value projection (c_attn, a Conv1D whose weight is [in, out]), learned position
embeddings added to the input (so PLOT vectors carry them), a pre-norm block."""
from __future__ import annotations

from typing import TYPE_CHECKING

from models.families import Family

if TYPE_CHECKING:     # torch only where a block runs: the PEFT conversion reads families without it
    import torch


def dims(config) -> dict:
    return {"hidden": config.n_embd, "intermediate": config.n_inner or 4 * config.n_embd, "layers": config.n_layer,
            "heads": config.n_head, "vocab": config.vocab_size, "max_positions": config.n_positions}


def check(config) -> None:
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn or not config.scale_attn_weights:
        raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn or "
                         "unscaled attention are not supported")


def embed(base, token_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return base.wte(token_ids) + base.wpe(positions)


def block(decoder, lora, block, x, bounds, kv, positions) -> torch.Tensor:
    import torch.nn.functional as F
    h = block.ln_1(x)
    fused = F.linear(h, block.attn.c_attn.weight.T, block.attn.c_attn.bias)   # Conv1D: x @ W + b
    q, k, v = (piece.contiguous() for piece in fused.split(decoder.dims.hidden, dim=-1))
    lora.add(q, h, "query")
    lora.add(k, h, "key")
    lora.add(v, h, "value")
    context = decoder.attention(lora.layer, q, k, v, bounds, kv)
    out = lora.add(F.linear(context, block.attn.c_proj.weight.T, block.attn.c_proj.bias), context, "attn_out")
    x = x + out
    h = block.ln_2(x)
    inter = decoder.act(lora.add(F.linear(h, block.mlp.c_fc.weight.T, block.mlp.c_fc.bias), h, "ffn_in"))
    return x + lora.add(F.linear(inter, block.mlp.c_proj.weight.T, block.mlp.c_proj.bias), inter, "ffn_out")


FAMILY = Family(
    name="gpt2", decoder=True, dims=dims, layers_path="transformer.h", peft_marker="h.",
    modules={"attn.c_attn": "qkv", "attn.c_proj": "attn_out", "mlp.c_fc": "ffn_in", "mlp.c_proj": "ffn_out"},
    transposed=True, base="transformer", blocks="h", final_norm="ln_f",
    hooks={"embed": embed, "block": block, "check": check,
           "activation": lambda config: config.activation_function})
