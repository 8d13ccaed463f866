"""The dimensions of a base model every service and trainer agrees on, read from its config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.families import family


@dataclass(frozen=True)
class ModelDims:
    family: str                     # config.model_type: a family of models/families ("bert", "gpt2", "llama")
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
        return family(self.family).decoder

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelDims":
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        found = family(config.model_type)
        return cls(family=found.name, **found.dims(config))
