"""Generation end to end through real processes (store, compute, gateway) serving a tiny random-weight
GPT-2 and Llama: greedy text equals transformers' generate with the tenant's LoRA merged, for requests
of several tenants that start at different times; streaming, seeds, stop strings, limits, cancellation."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from models.adapter_format import parse_adapter, random_adapter, serialize_adapter
from models.dims import ModelDims
from models.loading import load_causal_lm, load_tokenizer
from models.lora_merge import merged_model
from tests.conftest import start_services
from tests.helpers import expect_status, tiny_decoder

pytestmark = pytest.mark.integration
TARGETS = {"gpt2": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"),
           "llama": ("query", "value", "attn_out", "ffn_gate", "ffn_out")}
PROMPTS = ["the service was", "rain is expected", "I would like to return", "a great film"]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def suite(request, tmp_path_factory):
    """A running suite on a decoder, a split-layer-0 domain and three generative tenants."""
    from hmi.client import HMIClient
    family = request.param
    model_dir = tiny_decoder(family, tmp_path_factory.mktemp(f"tiny-{family}"))
    services = start_services(tmp_path_factory.mktemp(f"data-{family}"), model_dir)
    client = HMIClient(services.gateway_addr, timeout=60)
    dims = ModelDims.from_dir(model_dir)
    client.build_domain("chat", "", split_layer=0, context=1, min_count=1)
    adapters = {}
    for seed, rank in enumerate((4, 8, 2), start=1):
        data = serialize_adapter(random_adapter(dims, num_labels=0, rank=rank, first_layer=0,
                                                targets=TARGETS[family], seed=seed))
        tenant = f"writer-{seed}"
        client.register_tenant(tenant, "chat", [], data)
        adapters[tenant] = parse_adapter(data, dims, num_labels=0)
    yield family, model_dir, services, client, adapters
    client.close()
    services.stop()


def reference_tokens(model_dir, adapter, prompt_ids: list[int], new_tokens: int) -> list[int]:
    model = merged_model(load_causal_lm(model_dir), adapter)
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def collect(stream) -> tuple[str, list[int], str, int]:
    text, ids, reason, messages = "", [], "", 0
    for message in stream:
        text += message.text
        ids += list(message.token_ids)
        reason = message.finish_reason or reason
        messages += 1
    return text, ids, reason, messages


def test_greedy_generation_of_staggered_tenants_equals_transformers(suite):
    family, model_dir, _services, client, adapters = suite
    tokenizer = load_tokenizer(model_dir)
    calls = [(tenant, prompt) for prompt in PROMPTS for tenant in adapters]
    results: dict[int, tuple] = {}

    def run(index: int, tenant: str, prompt: str) -> None:
        time.sleep(0.03 * index)          # requests join while others are decoding
        # eos can't end it early: the reference is asked for exactly this many tokens as well
        results[index] = collect(client.generate(tenant, prompt, max_new_tokens=10, stop=None))

    threads = [threading.Thread(target=run, args=(i, t, p)) for i, (t, p) in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, (tenant, prompt) in enumerate(calls):
        text, ids, reason, messages = results[index]
        expected = reference_tokens(model_dir, adapters[tenant], tokenizer.encode(prompt).ids, 10)
        eos = 2
        if eos in expected:                # the served stream ends at end-of-text, like generate would
            expected = expected[:expected.index(eos) + 1]
        assert ids == expected, f"{family} {tenant} {prompt!r}"
        assert reason == ("stop" if expected[-1] == eos else "length")
        assert messages >= 2, "tokens must stream, not arrive in one message"
        assert text == tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True)


def test_generation_from_plot_at_split_layer_two(suite):
    """The prompt's layer-2 states come from the store's PLOT (exact here: a one-line corpus whose tokens
    are all distinct, context deep enough for every prefix), generated tokens' by window lookups."""
    family, model_dir, _services, client, _adapters = suite
    line = "the service was quick and very good for every one of us"
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(line).ids
    assert len(set(ids)) == len(ids), "the corpus line must not repeat a token"
    client.build_domain("plot2", line, split_layer=2, context=16, min_count=1)
    dims = ModelDims.from_dir(model_dir)
    data = serialize_adapter(random_adapter(dims, num_labels=0, rank=4, first_layer=2, targets=TARGETS[family],
                                            seed=9))
    client.register_tenant("plot-writer", "plot2", [], data)
    adapter = parse_adapter(data, dims, num_labels=0)
    prompt = " ".join(line.split()[:5])
    assert tokenizer.encode(prompt).ids == ids[:len(tokenizer.encode(prompt).ids)]
    _text, first, _reason, _ = collect(client.generate("plot-writer", prompt, max_new_tokens=1))
    assert first == reference_tokens(model_dir, adapter, tokenizer.encode(prompt).ids, 1)
    _text, more, reason, _ = collect(client.generate("plot-writer", prompt, max_new_tokens=8))
    assert more[0] == first[0] and (len(more) == 8 or reason == "stop")


def test_seeds_stop_strings_and_limits(suite):
    _family, model_dir, services, client, _adapters = suite
    sampled = dict(max_new_tokens=12, temperature=1.2, top_k=50, top_p=0.95)
    first = collect(client.generate("writer-1", "the service was", seed=11, **sampled))
    again = collect(client.generate("writer-1", "the service was", seed=11, **sampled))
    assert first[:3] == again[:3], "the same seed must give the same text"
    greedy = collect(client.generate("writer-2", "a great film", max_new_tokens=12))
    if len(greedy[0].strip()) > 4:
        stop = greedy[0].strip()[2:4]
        stopped = collect(client.generate("writer-2", "a great film", max_new_tokens=12, stop=[stop]))
        assert stopped[2] == "stop" and stopped[0].endswith(stop) and stop not in stopped[0][:-len(stop)]
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: collect(
        client.generate("writer-1", "hello", max_new_tokens=5000)))
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: collect(
        client.generate("writer-1", "hello", temperature=-1)))
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: collect(
        client.generate("writer-1", "hello", top_p=1.5)))
    expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: collect(client.generate("writer-1", "  ")))
    message = expect_status(grpc.StatusCode.INVALID_ARGUMENT, lambda: collect(
        client.generate("writer-1", "hello " * 100, max_new_tokens=100)))
    assert "positions" in message
    expect_status(grpc.StatusCode.NOT_FOUND, lambda: collect(client.generate("nobody", "hello")))
    assert "Generate" in expect_status(grpc.StatusCode.FAILED_PRECONDITION, client.classify, "writer-1", ["hi"])
    assert "labels" in expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.register_tenant, "w9", "chat",
                                     ["a", "b"])


def test_a_client_that_goes_away_frees_its_kv_cache(suite):
    _family, _model_dir, services, client, _adapters = suite
    stream = client.generate("writer-3", "the service was", max_new_tokens=100, temperature=1.0, seed=1)
    next(iter(stream))
    stream.cancel()
    with grpc.insecure_channel(services.compute_addrs[0]) as channel:
        stub = compute_pb2_grpc.ComputeStub(channel)
        deadline = time.monotonic() + 10
        while True:
            stats = stub.Stats(compute_pb2.StatsRequest(), timeout=5)
            if stats.generating == 0 and stats.kv_bytes_used == 0:
                break
            assert time.monotonic() < deadline, f"KV cache still held: {stats}"
            time.sleep(0.05)
        assert stats.generated_tokens < 100 * 20, "the cancelled sequence must not run to its end"
        assert stats.kv_budget_bytes > 0


def test_one_deployment_hosts_an_encoder_and_a_decoder(tmp_path, tiny_model_dir):
    """`hmi up --model enc=DIR --model gen=DIR`: one store, one compute per model, one gateway routing by model."""
    from hmi.client import HMIClient
    from hmi.launcher import ServiceSet
    decoder_dir = tiny_decoder("gpt2", tmp_path / "gen")
    services = ServiceSet.on_free_ports(tmp_path / "data", model=f"enc={tiny_model_dir},gen={decoder_dir}",
                                        log_dir=tmp_path / "logs", extra_env={"HMI_TORCH_THREADS": "1"})
    services.start(timeout=180)
    try:
        with HMIClient(services.gateway_addr, timeout=60) as client:
            assert client.build_domain("reviews", "", split_layer=0, context=1, min_count=1).model == "enc"
            assert client.build_domain("stories", "", split_layer=0, context=1, min_count=1, model="gen").model == "gen"
            assert client.register_tenant("critic", "reviews", ["neg", "pos"]).spec.model == "enc"
            assert client.register_tenant("bard", "stories", [], model="gen").spec.model == "gen"
            assert client.classify("critic", ["a fine film"])[0].label in ("neg", "pos")
            text, ids, reason, _ = collect(client.generate("bard", "once upon a time", max_new_tokens=5))
            assert len(ids) >= 1 and reason in ("length", "stop")
            assert "belongs to" in expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.register_tenant, "x",
                                                 "reviews", [], model="gen")
            assert "not served" in expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.build_domain, "d", "",
                                                 split_layer=0, context=1, min_count=1, model="nope")
            # No split layer given: a decoder's new domain gets 0 (no corpus needed), an encoder's half its
            # layers (the corpus is then required), and a rebuild keeps the domain's L.
            assert client.build_domain("tales", "", split_layer=-1, context=1, min_count=1,
                                       model="gen").spec.split_layer == 0
            assert "corpus is empty" in expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.build_domain, "notes",
                                                      "", split_layer=-1, context=1, min_count=1)
            assert client.build_domain("notes", "a fine film\na dull plot", split_layer=-1, context=1,
                                       min_count=1).spec.split_layer == 2   # 4 layers
            assert client.build_domain("reviews", "", split_layer=-1, context=1, min_count=1).spec.split_layer == 0
        names = set()
        for address in services.compute_addrs + list(services.other_compute.values()):
            with grpc.insecure_channel(address) as channel:
                names.add(compute_pb2_grpc.ComputeStub(channel).Stats(compute_pb2.StatsRequest(), timeout=5).model)
        assert names == {"enc", "gen"}
    finally:
        services.stop()


def test_hmi_tenant_train_fits_a_generative_tenant_on_plot_outputs(suite, tmp_path):
    """Causal-LM LoRA training on a domain's PLOT (split layer 1) through the CLI; the served tenant then
    continues the domain's text the way it was trained to."""
    import os
    import re
    import subprocess

    from hmi.launcher import hmi_command
    family, model_dir, services, client, _adapters = suite
    sentences = ["the service was quick and very good for every one of us",
                 "we had a good time at the hotel with our friends"]
    (tmp_path / "train.txt").write_text("\n".join(sentences * 40))
    (tmp_path / "eval.txt").write_text("\n".join(sentences * 2))
    client.build_domain("prose", "\n".join(sentences * 4), split_layer=1, context=3, min_count=1)
    env = {**os.environ, "HMI_GATEWAY_ADDR": services.gateway_addr}
    result = subprocess.run(hmi_command() + ["tenant", "train", "narrator", "--domain", "prose", "--train",
                                            str(tmp_path / "train.txt"), "--eval", str(tmp_path / "eval.txt"),
                                            "--model", str(model_dir), "--epochs", "15", "--rank", "8",
                                            "--learning-rate", "0.02", "--batch-size", "8",
                                            "--targets", ",".join(TARGETS[family])],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    base, tuned = map(float, re.search(r"perplexity ([\d.]+) \(base\) -> ([\d.]+)", result.stdout).groups())
    assert tuned < base / 20, result.stdout
    assert "generative" in result.stdout
    text, _ids, _reason, _ = collect(client.generate("narrator", "the service was", max_new_tokens=6))
    assert text.startswith(" quick and very good"), f"{family}: {text!r}"


def test_hmi_generate_streams_to_the_terminal(suite):
    import os
    import subprocess

    from hmi.launcher import hmi_command
    _family, _model_dir, services, client, _adapters = suite
    env = {**os.environ, "HMI_GATEWAY_ADDR": services.gateway_addr}
    command = hmi_command() + ["generate", "writer-1", "the service was", "--max-new-tokens", "5", "--seed", "3",
                               "--temperature", "0.8"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == again.stdout, "the same seed prints the same text"
    assert "finish:" in first.stderr and "tokens" in first.stderr
    missing = subprocess.run(hmi_command() + ["generate", "nobody", "hi"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
