"""Shared fixtures: a tiny random-weight BERT (with the real MiniLM tokenizer) and running services."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """4 layers, hidden 64, MiniLM's vocabulary and tokenizer: real transformers code, fast on CPU."""
    import torch
    from transformers import BertConfig, BertModel

    from services.common.packaged_models import packaged_minilm_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        source = packaged_minilm_dir() / name
        if source.exists():
            shutil.copy(source, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from models.loading import load_bert
    return load_bert(tiny_model_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from models.loading import load_tokenizer
    return load_tokenizer(tiny_model_dir)


def start_services(data_dir: Path, model: Path, computes: int = 1, **env):
    from hmi.launcher import ServiceSet
    services = ServiceSet.on_free_ports(data_dir, computes=computes, model=str(model), log_dir=data_dir / "logs",
                                       extra_env={"HMI_MAX_WAIT_MS": "20", "HMI_TORCH_THREADS": "1",
                                                  "HMI_LEARN_INTERVAL": "0.5", **env})
    services.start(timeout=180)
    return services


@pytest.fixture(scope="session")
def services(tmp_path_factory, tiny_model_dir):
    """One running suite (store, compute, gateway as real processes) shared by the integration tests. Its compute
    executes in chunks of at most 24 tokens, so every exactness test checks batches cut into chunks (run in fair
    order, their results joined) against transformers."""
    running = start_services(tmp_path_factory.mktemp("hmi-data"), tiny_model_dir, HMI_EXECUTE_CHUNK_TOKENS="24")
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(services):
    """The admin's client: the token the launcher wrote into the data dir, as `hmi up` does."""
    with services.client(timeout=60) as hmi_client:
        yield hmi_client


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The tests' tiny random Llama (tests/helpers.py) with a chat template, as instruction models ship one."""
    import json

    from tests.helpers import tiny_decoder
    folder = tiny_decoder("llama", tmp_path_factory.mktemp("tiny-llama-chat"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.fixture(scope="session")
def front_door(tmp_path_factory, tiny_model_dir, tiny_llama_dir):
    """One deployment of an encoder (`enc`, the tiny BERT) and a decoder (`gen`, the tiny Llama) with its HTTP
    front door, shared by the tests of the HTTP API, PEFT adapters, the slim client and the examples."""
    from hmi.launcher import ServiceSet
    data = tmp_path_factory.mktemp("front-door")
    running = ServiceSet.on_free_ports(data, model=f"enc={tiny_model_dir},gen={tiny_llama_dir}", log_dir=data / "logs",
                                       extra_env={"HMI_MAX_WAIT_MS": "5", "HMI_TORCH_THREADS": "1"})
    running.start(timeout=180)
    yield running
    running.stop()
