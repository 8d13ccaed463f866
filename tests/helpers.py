"""Small helpers for integration tests."""
from __future__ import annotations

import time

import grpc
import pytest


def expect_status(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    """Runs a call that must fail with `code`; returns the message, which must be non-empty."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    assert caught.value.code() == code, f"expected {code.name}, got {caught.value.code().name}: {caught.value.details()}"
    assert caught.value.details(), "the status must carry a message a person can act on"
    return caught.value.details()


def retry_until_served(call, *args, timeout: float = 20.0):
    """Calls until a restarted peer answers (channels reconnect with backoff); re-raises after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(*args)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def tiny_decoder(family: str, folder, vocab: int = 1000):
    """A random-weight GPT-2 or Llama (grouped-query attention: 4 heads over 2 key/value heads), 4 layers,
    weights drawn wider than transformers' default so the tied LM head can express peaked distributions,
    with a byte-level BPE tokenizer trained here on the demo corpus (<pad>, <s>, </s> = ids 0, 1, 2)."""
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    corpus = Path(__file__).resolve().parent.parent / "data" / "demo_corpus.txt"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus.read_text(encoding="utf-8").splitlines(), trainer)
    vocab = tokenizer.get_vocab_size()
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                           bos_token_id=1, eos_token_id=2, initializer_range=0.15))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                             tie_word_embeddings=True, initializer_range=0.15))
    model.save_pretrained(folder)
    tokenizer.save(str(Path(folder) / "tokenizer.json"))
    return Path(folder)
