"""Small helpers for integration tests."""
from __future__ import annotations

import contextlib
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


def internal_channel(services, address: str) -> grpc.Channel:
    """A channel to the store or a compute of `services` with the deployment's service secret (and TLS), as the
    services themselves call each other: the internal services refuse anyone else."""
    from services.common.rpc import channel
    return channel(address, security=services.peer_security())


def cli_env(services, **extra: str) -> dict[str, str]:
    """The environment of a CLI run on the deployment's machine: its gateway and data dir, no token variable, so
    the CLI reads the admin token `hmi up` wrote into the data dir (the path a local user takes)."""
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("HMI_TOKEN", "HMI_ADMIN_TOKEN")}
    return {**env, "HMI_GATEWAY_ADDR": services.gateway_addr, "HMI_DATA_DIR": str(services.data_dir), **extra}


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


def make_certificates(folder, name: str = "hmi test", names: str = "DNS:localhost,IP:127.0.0.1"):
    """A CA and a certificate it signed for `names` (subjectAltName; by default localhost / 127.0.0.1; server and
    client use, so every service shows it to its peers), made with openssl at test time: EC P-256 keys, valid
    one day. Returns the launcher's TlsFiles."""
    import subprocess
    from pathlib import Path

    from hmi.launcher import TlsFiles
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", f"/CN={name} CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "service.key", "-out", "service.csr", "-subj", "/CN=localhost")
    (folder / "service.ext").write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n"
                                        "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "service.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "service.pem", "-days", "1", "-extfile", "service.ext")
    return TlsFiles(cert=folder / "service.pem", key=folder / "service.key", ca=folder / "ca.pem")


@contextlib.contextmanager
def extra_gateway(services, model_dir, name: str = "gateway-2", **env: str):
    """Another gateway process on the same store and compute (its own directory, batcher and quotas);
    yields an admin client of it."""
    import os
    import subprocess

    from hmi.client import HMIClient, is_serving
    from hmi.launcher import free_port, hmi_command
    address = f"127.0.0.1:{free_port()}"
    log = open(services.data_dir / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen(hmi_command() + ["serve", "gateway", "--listen", address, "--store",
                                                services.store_addr, "--compute", services.compute_addrs[0],
                                                "--model", str(model_dir),
                                                "--service-secret-file", str(services.service_secret_file),
                                                "--admin-token-file", str(services.admin_token_file)],
                               env={**os.environ, "HMI_MAX_WAIT_MS": "20", **env}, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not is_serving(address):
            assert process.poll() is None and time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.1)
        with HMIClient(address, timeout=60, token=services.admin_token) as client:
            yield client
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
