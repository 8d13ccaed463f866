"""The dimensions of a base model every service and trainer agrees on, read from its config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument

ENCODER_FAMILIES = ("bert",)
DECODER_FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelDims:
    family: str                     # "bert" (encoder), "gpt2" or "llama" (decoders), from config.model_type
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    max_positions: int
    kv_heads: int = 0               # key/value heads (grouped-query attention); 0 = heads
    head_dim: int = 0               # 0 = hidden // heads

    def __post_init__(self) -> None:
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def is_decoder(self) -> bool:
        return self.family in DECODER_FAMILIES

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelDims":
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        kind = config.model_type
        if kind == "bert":
            return cls(family="bert", hidden=config.hidden_size, intermediate=config.intermediate_size,
                       layers=config.num_hidden_layers, heads=config.num_attention_heads,
                       vocab=config.vocab_size, max_positions=config.max_position_embeddings)
        if kind == "gpt2":
            return cls(family="gpt2", hidden=config.n_embd, intermediate=config.n_inner or 4 * config.n_embd,
                       layers=config.n_layer, heads=config.n_head, vocab=config.vocab_size,
                       max_positions=config.n_positions)
        if kind == "llama":
            heads = config.num_attention_heads
            return cls(family="llama", hidden=config.hidden_size, intermediate=config.intermediate_size,
                       layers=config.num_hidden_layers, heads=heads, vocab=config.vocab_size,
                       max_positions=config.max_position_embeddings,
                       kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                       head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)
        raise InvalidArgument(f"model type {kind!r} is not supported: HMI serves the BERT family (encoders) and "
                              f"the GPT-2 and Llama families (decoders)")
