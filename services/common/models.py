"""Base models: resolving a name or local folder, and the dimensions every service agrees on.

Nothing is ever downloaded: transformers is always called with local_files_only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.packaged_models import packaged_minilm_dir, packaged_smollm2_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


KNOWN_MODELS = {"minilm": packaged_minilm_dir, "smollm2": packaged_smollm2_dir}


def resolve_model_dir(name_or_path: str) -> Path:
    """`minilm` (the packaged MiniLM), `smollm2` (the packaged SmolLM2-135M-Instruct) or a local folder
    with config.json."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"model {name_or_path!r} is neither a known name {sorted(KNOWN_MODELS)} "
                              f"nor a local folder with config.json")
    return path.resolve()


def model_name(name_or_path: str) -> str:
    if "=" in name_or_path:
        return name_or_path.split("=", 1)[0]
    return name_or_path if name_or_path in KNOWN_MODELS else Path(name_or_path).name


@dataclass(frozen=True)
class ModelSpec:
    name: str            # what tenants, domains and replicas call it
    directory: Path


def parse_model_specs(values: list[str] | str | None) -> list[ModelSpec]:
    """`NAME=DIR`, a known name (`minilm`, `smollm2`) or a folder (named after it), repeated or
    comma-separated; the first is the deployment's default model."""
    items = [values] if isinstance(values, str) else list(values or [])
    entries = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not entries:
        raise InvalidArgument("no base model given: --model NAME=DIR (or minilm, smollm2) [HMI_MODEL]")
    specs: list[ModelSpec] = []
    for entry in entries:
        name, _, location = entry.partition("=")
        if not location:
            name, location = model_name(entry), entry
        if not name or not all(c.isalnum() or c in "._-" for c in name):
            raise InvalidArgument(f"model name {name!r} in {entry!r}: use letters, digits, '.', '_' or '-'")
        if any(spec.name == name for spec in specs):
            raise InvalidArgument(f"model {name!r} is given twice")
        specs.append(ModelSpec(name, resolve_model_dir(location)))
    return specs


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


def load_bert(model_dir: Path):
    """Plain transformers BertModel in eval mode, fp32, eager attention (bit-stable reference)."""
    from transformers import BertModel
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False,
                                      attn_implementation="eager")
    return model.eval()


def eos_token_ids(model_dir: Path) -> tuple[int, ...]:
    """End-of-text token ids of a decoder (generation_config.json first, then config.json)."""
    import json
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return tuple(value) if isinstance(value, list) else (int(value),)
    return ()


def load_causal_lm(model_dir: Path):
    """Plain transformers GPT-2 or Llama causal LM in eval mode, fp32, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager",
                                                 dtype=torch.float32)
    return model.eval()


def load_tokenizer(model_dir: Path):
    """Fast tokenizer straight from tokenizer.json (tokenizers library; no weights involved)."""
    from tokenizers import Tokenizer
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InvalidArgument(f"{model_dir} has no tokenizer.json (a fast tokenizer is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
