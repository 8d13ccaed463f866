"""BERT-style encoders (MiniLM and the like): separate query, key and value projections, a post-norm block."""
from __future__ import annotations

from models.families import Family


def dims(config) -> dict:
    return {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads, "vocab": config.vocab_size,
            "max_positions": config.max_position_embeddings}


FAMILY = Family(
    name="bert", decoder=False, dims=dims, layers_path="encoder.layer", peft_marker="encoder.layer.",
    modules={"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
             "attention.output.dense": "attn_out", "intermediate.dense": "ffn_in", "output.dense": "ffn_out"})
