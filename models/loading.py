"""Loading base models and tokenizers from local folders: plain transformers modules in eval mode, fp32,
eager attention (bit-stable references). Nothing is ever downloaded (local_files_only; see __init__.py).
"""
from __future__ import annotations

from pathlib import Path

from hmi_errors import InvalidArgument


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


def decoder_base(causal_lm):
    """The GPT2Model / LlamaModel inside a causal LM (the lower layers live there; no LM head needed)."""
    from models.families import family
    return getattr(causal_lm, family(causal_lm.config.model_type).base)
