"""The HTTP front door through the official `openai` client and plain HTTP, against real processes (tiny
BERT `enc` and tiny Llama `gen`): every answer equals what the gRPC API gives for the same tenant and input;
streamed text equals the whole text; bad requests come back as the client's typed errors; a streaming
client that goes away stops the generation."""
from __future__ import annotations

import http.client
import json
import time

import grpc
import numpy as np
import openai
import pytest

from hmi_client import FailedPrecondition
from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from tests.helpers import expect_status, internal_channel

pytestmark = pytest.mark.integration
TEXTS = ["the service was quick and friendly", "rain is expected tomorrow"]


@pytest.fixture(scope="module")
def deployment(front_door):
    """Tenants of every kind: a classifier, an embedding-only tenant and a generative one."""
    client = front_door.client(timeout=60)
    client.build_domain("http-reviews", "", split_layer=0, context=1, min_count=1)
    client.build_domain("http-stories", "", split_layer=0, context=1, min_count=1, model="gen")
    client.register_tenant("http-critic", "http-reviews", ["neg", "pos"], seed=1)
    client.register_tenant("http-embedder", "http-reviews", [], seed=2)
    client.register_tenant("http-bard", "http-stories", [], seed=3)
    api = openai.OpenAI(base_url=f"http://{front_door.http_addr}/v1", api_key=front_door.admin_token, max_retries=0,
                        timeout=60)
    yield front_door, client, api
    client.close()


def grpc_text(client, tenant: str, prompt: str, **kwargs) -> str:
    return client.generate(tenant, prompt, **kwargs).collect().text


def test_models_list_names_every_tenant_with_what_it_does(deployment):
    _services, _client, api = deployment
    models = {model.id: model for model in api.models.list()}
    assert {"http-critic", "http-embedder", "http-bard"} <= set(models)
    assert models["http-critic"].task == "classify" and models["http-critic"].labels == ["neg", "pos"]
    assert models["http-embedder"].task == "embed" and models["http-bard"].task == "generate"
    assert api.models.retrieve("http-bard").base_model == "gen"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("nobody")


def test_embeddings_equal_grpc_embed_as_floats_and_base64(deployment):
    _services, client, api = deployment
    expected = np.array(client.embed("http-embedder", TEXTS))
    for encoding in ("float", "base64"):
        reply = api.embeddings.create(model="http-embedder", input=TEXTS, encoding_format=encoding)
        if encoding == "base64":     # the client hands base64 through as it came
            import base64
            got = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in reply.data])
        else:
            got = np.array([d.embedding for d in reply.data])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert reply.usage.prompt_tokens > len(TEXTS)
    # The client's default asks for base64 and decodes it.
    default = api.embeddings.create(model="http-embedder", input=TEXTS[0])
    np.testing.assert_allclose(default.data[0].embedding, expected[0], atol=1e-6)
    # A classifier embeds too; classifying an embedding-only tenant says why it cannot.
    assert len(api.embeddings.create(model="http-critic", input="a").data[0].embedding) == 64
    assert "embedding-only" in expect_status(grpc.StatusCode.FAILED_PRECONDITION, client.classify, "http-embedder",
                                             ["hi"])
    with pytest.raises(FailedPrecondition):
        client.classify("http-embedder", ["hi"])


def test_completions_equal_grpc_generate_streamed_or_not(deployment):
    _services, client, api = deployment
    greedy = api.completions.create(model="http-bard", prompt="the service was", max_tokens=10, temperature=0)
    assert greedy.choices[0].text == grpc_text(client, "http-bard", "the service was", max_new_tokens=10)
    assert greedy.usage.completion_tokens == 10 and greedy.usage.prompt_tokens > 0
    assert greedy.choices[0].finish_reason == "length"
    sampled = dict(model="http-bard", prompt="rain is expected", max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    whole = api.completions.create(**sampled).choices[0].text
    chunks = list(api.completions.create(**sampled, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert len(chunks) > 3, "text must arrive in several events"
    assert chunks[-1].usage.completion_tokens == 12
    assert whole == grpc_text(client, "http-bard", "rain is expected", max_new_tokens=12, temperature=0.9,
                              top_p=0.95, seed=7)
    # OpenAI's stop strings end the text before them (HMI's gRPC API keeps them).
    full = greedy.choices[0].text
    if len(full.strip()) > 4:
        stop = full.strip()[2:4]
        stopped = api.completions.create(model="http-bard", prompt="the service was", max_tokens=10, temperature=0,
                                         stop=[stop])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == full[:full.index(stop)]


def test_chat_uses_the_models_chat_template_streamed_or_not(deployment, tiny_llama_dir):
    from transformers import AutoTokenizer
    _services, client, api = deployment
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a great film"}]
    kwargs = dict(model="http-bard", messages=messages, max_tokens=8, temperature=0.8, seed=5)
    whole = api.chat.completions.create(**kwargs)
    streamed = list(api.chat.completions.create(**kwargs, stream=True))
    assert whole.choices[0].message.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content
    assert streamed[0].choices[0].delta.role == "assistant" and streamed[-1].choices[0].finish_reason == "length"
    prompt = AutoTokenizer.from_pretrained(str(tiny_llama_dir)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("assistant:")
    assert whole.choices[0].message.content == grpc_text(client, "http-bard", prompt, max_new_tokens=8,
                                                         temperature=0.8, seed=5)


def test_several_prompts_token_prompts_and_n_choices(deployment):
    """What LangChain's batch calls and lm-eval send: a list of prompts (one choice each, in order), token ids of
    the model's tokenizer, and n choices per prompt (seeded: reproducible, and different from each other)."""
    services, client, api = deployment
    prompts = ["the service was", "rain is expected"]
    reply = api.completions.create(model="http-bard", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.text for c in reply.choices] == [grpc_text(client, "http-bard", p, max_new_tokens=6) for p in prompts]
    ids = [t["id"] for t in tei_tokens(services, "http-bard", prompts[0])]     # the gateway's own tokenizer
    by_ids = api.completions.create(model="http-bard", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text
    assert client.generate("http-bard", prompt_ids=ids, max_new_tokens=6).collect().text == reply.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    two = api.completions.create(model="http-bard", prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in two.choices] == [reply.choices[0].text] * 2
    sampled = api.completions.create(model="http-bard", prompt=prompts[0], max_tokens=12, n=3, seed=7)
    again = api.completions.create(model="http-bard", prompt=prompts[0], max_tokens=12, n=3, seed=7)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len({c.text for c in sampled.choices}) > 1
    assert sampled.usage.prompt_tokens == len(ids)            # the prompt counts once, whatever n
    assert 3 <= sampled.usage.completion_tokens <= 3 * 12
    chat = api.chat.completions.create(model="http-bard", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=5, n=2, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    streamed: dict[int, str] = {}
    for chunk in api.completions.create(model="http-bard", prompt=prompts, max_tokens=6, temperature=0,
                                        stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: reply.choices[0].text, 1: reply.choices[1].text}
    # vLLM's extensions: served (ignore_eos, include_stop_str_in_output, truncate_prompt_tokens) or refused
    long = api.completions.create(model="http-bard", prompt=prompts[0], max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert long.usage.completion_tokens == 12 and long.choices[0].finish_reason == "length"
    cut = api.completions.create(model="http-bard", prompt="x y z " + prompts[0], max_tokens=6, temperature=0,
                                 extra_body={"truncate_prompt_tokens": len(ids) - 1})
    assert cut.usage.prompt_tokens == len(ids) - 1
    full = api.completions.create(model="http-bard", prompt=prompts[0], max_tokens=10, temperature=0).choices[0].text
    stop = full[3:5]
    assert len(stop) == 2, full
    kept = api.completions.create(model="http-bard", prompt=prompts[0], max_tokens=10, temperature=0, stop=[stop],
                                  extra_body={"include_stop_str_in_output": True}).choices[0]
    cut_off = api.completions.create(model="http-bard", prompt=prompts[0], max_tokens=10, temperature=0,
                                     stop=[stop]).choices[0]
    assert kept.finish_reason == "stop" and kept.text.endswith(stop) and kept.text == cut_off.text + stop
    # Penalties: OpenAI's two and vLLM's repetition_penalty, the same through either door
    penalised = api.completions.create(model="http-bard", prompt=prompts[0], max_tokens=10, temperature=0,
                                       frequency_penalty=2.0, presence_penalty=1.0,
                                       extra_body={"repetition_penalty": 1.5}).choices[0].text
    through_grpc = client.generate("http-bard", prompts[0], max_new_tokens=10, frequency_penalty=2.0,
                                   presence_penalty=1.0, repetition_penalty=1.5).collect().text
    assert penalised == through_grpc and penalised != full
    for extra, message in (({"frequency_penalty": 2.5}, "frequency_penalty must lie in"),
                           ({"repetition_penalty": 0}, "repetition_penalty must lie in")):
        with pytest.raises(openai.BadRequestError, match=message):
            api.completions.create(model="http-bard", prompt="hi", max_tokens=2, extra_body=extra)
    for extra in ({"min_tokens": 3}, {"length_penalty": 0.5}, {"guided_grammar": "root ::= \"a\""},
                  {"use_beam_search": True}):
        with pytest.raises(openai.BadRequestError, match="not supported"):
            api.completions.create(model="http-bard", prompt="hi", max_tokens=2, extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="token ids"):
        api.completions.create(model="http-bard", prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="choices per request"):
        api.completions.create(model="http-bard", prompt=["a"] * 9, n=2, max_tokens=2)


def test_structured_output_through_the_openai_client_and_grpc(deployment):
    """The text parses (json.loads, re.fullmatch), whatever the random tiny model would have written."""
    import re

    from hmi_client import InvalidArgument
    _services, client, api = deployment
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
              "required": ["name", "ok"]}
    chat = api.chat.completions.create(model="http-bard", messages=[{"role": "user", "content": "a thing"}],
                                       max_tokens=60, temperature=0, response_format={
                                           "type": "json_schema", "json_schema": {"name": "thing", "schema": schema}})
    value = json.loads(chat.choices[0].message.content)
    assert chat.choices[0].finish_reason == "stop" and set(value) == {"name", "ok"} and isinstance(value["ok"], bool)
    free = api.chat.completions.create(model="http-bard", messages=[{"role": "user", "content": "a thing"}],
                                       max_tokens=60, temperature=0.8, seed=1, response_format={"type": "json_object"})
    content = free.choices[0].message.content      # its keys are free strings: it may run out of tokens first
    assert content.startswith("{") and free.choices[0].finish_reason in ("stop", "length")
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    picked = api.completions.create(model="http-bard", prompt="pick", max_tokens=10, temperature=1.0, seed=2,
                                    extra_body={"guided_choice": ["red", "green"]}).choices[0].text
    assert picked in ("red", "green")
    through_grpc = client.generate("http-bard", "code", max_new_tokens=10, regex="[0-9]{3}").collect()
    assert re.fullmatch("[0-9]{3}", through_grpc.text) and through_grpc.finish_reason == "stop"
    as_schema = client.generate("http-bard", "code", max_new_tokens=60, json_schema=schema).collect().text
    assert set(json.loads(as_schema)) == {"name", "ok"}
    with pytest.raises(openai.BadRequestError, match="not valid JSON"):
        api.completions.create(model="http-bard", prompt="x", max_tokens=5, extra_body={"guided_json": "{oops"})
    with pytest.raises(openai.BadRequestError, match="at most one"):
        api.completions.create(model="http-bard", prompt="x", max_tokens=5,
                               extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        api.completions.create(model="http-bard", prompt="x", max_tokens=5,
                               extra_body={"guided_regex": "a", "ignore_eos": True})
    with pytest.raises(InvalidArgument, match="cannot be used"):
        client.generate("http-bard", "x", max_new_tokens=5, regex="(").collect()


def test_a_session_id_is_taken_through_both_doors_and_bounded(deployment):
    from hmi_client import InvalidArgument
    _services, client, api = deployment
    plain = api.completions.create(model="http-bard", prompt="once", max_tokens=6, temperature=0).choices[0].text
    in_session = api.completions.create(model="http-bard", prompt="once", max_tokens=6, temperature=0,
                                        extra_body={"session_id": "chat-1"}).choices[0].text
    assert in_session == plain == client.generate("http-bard", "once", max_new_tokens=6,
                                                  session_id="chat-1").collect().text
    with pytest.raises(openai.BadRequestError, match="session_id"):
        api.completions.create(model="http-bard", prompt="x", max_tokens=2, extra_body={"session_id": "s" * 300})
    with pytest.raises(InvalidArgument, match="session_id"):
        client.generate("http-bard", "x", max_new_tokens=2, session_id="s" * 300).collect()



def test_a_kv_budget_is_taken_through_both_doors(deployment):
    """A budget of one block on a longer prompt: the generation runs to its length with fewer keys."""
    from hmi_client import InvalidArgument
    _services, client, api = deployment
    prompt = "the quick brown fox jumps over the lazy dog " * 4
    budgeted = api.completions.create(model="http-bard", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"kv_budget": 16, "ignore_eos": True}).choices[0]
    assert budgeted.finish_reason == "length"
    through_grpc = client.generate("http-bard", prompt, max_new_tokens=12, kv_budget=16, ignore_eos=True).collect()
    assert through_grpc.text == budgeted.text
    with pytest.raises(openai.BadRequestError, match="kv_budget"):
        api.completions.create(model="http-bard", prompt="x", max_tokens=2, extra_body={"kv_budget": 5})
    with pytest.raises(InvalidArgument, match="kv_budget"):
        client.generate("http-bard", "x", max_new_tokens=2, kv_budget=-1).collect()


def test_logprobs_and_echo_equal_transformers_with_the_adapter_merged(deployment, tiny_llama_dir):
    """The log-probabilities of the prompt (echo, what lm-eval's loglikelihood reads) and of the generated
    tokens equal the plain transformers model with the tenant's adapter merged into its weights."""
    import torch

    from models.adapter_format import parse_adapter
    from models.dims import ModelDims
    from models.loading import load_causal_lm
    from models.lora_merge import merged_model
    services, client, api = deployment
    ids = [t["id"] for t in tei_tokens(services, "http-bard", "the service was quick")]
    adapter = parse_adapter(client.get_adapter("http-bard"), ModelDims.from_dir(tiny_llama_dir), num_labels=0)
    reference = merged_model(load_causal_lm(tiny_llama_dir), adapter)

    def log_probs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(reference(torch.tensor([tokens])).logits[0].double(), -1)

    # lm-eval's loglikelihood request: token ids, echo, one token generated, one alternative each.
    reply = api.completions.create(model="http-bard", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                   echo=True)
    scored = reply.choices[0].logprobs
    assert len(scored.tokens) == len(ids) + 1 and scored.token_logprobs[0] is None
    generated = api.completions.create(model="http-bard", prompt=ids, max_tokens=1, temperature=0).choices[0]
    expected = log_probs(ids + [0])
    for position in range(1, len(ids)):
        assert abs(scored.token_logprobs[position] - float(expected[position - 1, ids[position]])) < 1e-4
        best = max(scored.top_logprobs[position].values())
        assert abs(best - float(expected[position - 1].max())) < 1e-4
    last = int(expected[len(ids) - 1].argmax())
    assert abs(scored.token_logprobs[-1] - float(expected[len(ids) - 1, last])) < 1e-4
    assert reply.choices[0].text.endswith(generated.text) and scored.text_offset[0] == 0
    assert "".join(scored.tokens[:len(ids)]) == reply.choices[0].text[:len(reply.choices[0].text) - len(generated.text)]
    # the gRPC door answers the same log-probabilities
    from hmi_client.v1 import gateway_pb2, gateway_pb2_grpc
    stub = gateway_pb2_grpc.GatewayStub(client.channel)
    messages = list(stub.Generate(gateway_pb2.GenerateTextRequest(tenant_id="http-bard", prompt_ids=ids, max_new_tokens=1,
                                                                  logprobs=1, prompt_logprobs=True),
                                  metadata=(("authorization", f"Bearer {services.admin_token}"),), timeout=30))
    over_grpc = [e.token.logprob if e.token.HasField("logprob") else None for e in messages[0].prompt_logprobs]
    assert over_grpc[0] is None and len(over_grpc) == len(ids)
    assert all(abs(a - b) < 1e-5 for a, b in zip(over_grpc[1:], scored.token_logprobs[1:len(ids)]))
    # echo with max_tokens 0: the prompt and its log-probabilities only
    only = api.completions.create(model="http-bard", prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert len(only.choices[0].logprobs.tokens) == len(ids) and only.usage.completion_tokens == 0
    # chat: each generated token's log-probability and alternatives
    chat = api.chat.completions.create(model="http-bard", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert 1 <= len(content) <= 4 and all(len(t.top_logprobs) == 3 for t in content)
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 for t in content)     # greedy: the likeliest
    # streamed: each chunk carries its tokens' log-probabilities, together those of the whole answer
    whole = api.completions.create(model="http-bard", prompt=ids, max_tokens=6, temperature=0, logprobs=2)
    streamed = [c.choices[0].logprobs for c in api.completions.create(
        model="http-bard", prompt=ids, max_tokens=6, temperature=0, logprobs=2, stream=True) if c.choices]
    assert sum((s.token_logprobs for s in streamed if s), []) == pytest.approx(
        whole.choices[0].logprobs.token_logprobs, abs=1e-6)
    chat_streamed = [c.choices[0].logprobs for c in api.chat.completions.create(
        model="http-bard", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t.logprob for s in chat_streamed for t in s.content] == pytest.approx(
        [t.logprob for t in content], abs=1e-6)
    with pytest.raises(openai.BadRequestError, match="without stream"):
        api.completions.create(model="http-bard", prompt="hi", max_tokens=2, logprobs=1, echo=True, stream=True)
    with pytest.raises(openai.BadRequestError, match="at most 20"):
        api.completions.create(model="http-bard", prompt="hi", max_tokens=2, logprobs=21)


def tei_tokens(services, tenant: str, text: str) -> list[dict]:
    status, reply = request(services.http_addr, "POST", f"/tei/{tenant}/tokenize",
                            {"inputs": text}, services.admin_token)
    assert status == 200, reply
    return reply[0]


def test_bad_requests_are_the_clients_typed_errors(deployment):
    _services, _client, api = deployment
    with pytest.raises(openai.NotFoundError) as missing:
        api.completions.create(model="nobody", prompt="hi")
    assert missing.value.status_code == 404 and "nobody" in missing.value.message
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="nobody", input="hi")
    bad = [dict(n=17), dict(n=0), dict(temperature=-1), dict(max_tokens=100_000), dict(top_p=1.5), dict(logprobs=99)]
    for params in bad:
        with pytest.raises(openai.BadRequestError) as refused:
            api.completions.create(model="http-bard", prompt="hi", **params)
        assert refused.value.status_code == 400 and refused.value.message, params
    with pytest.raises(openai.BadRequestError, match="generate"):
        api.embeddings.create(model="http-bard", input="hi")
    with pytest.raises(openai.BadRequestError, match="does not generate|classifier"):
        api.chat.completions.create(model="http-critic", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        api.embeddings.create(model="http-embedder", input="hi", dimensions=3)


def request(address: str, method: str, path: str, body: dict | None = None,
            token: str | None = None) -> tuple[int, dict | str]:
    connection = http.client.HTTPConnection(address, timeout=30)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        reply = connection.getresponse()
        data = reply.read().decode()
        return reply.status, json.loads(data) if reply.getheader("content-type", "").startswith("application/json") \
            else data
    finally:
        connection.close()


def test_classify_health_ready_and_docs_over_plain_http(deployment):
    services, client, _api = deployment
    address, token = services.http_addr, services.admin_token
    status, reply = request(address, "POST", "/v1/classify", {"model": "http-critic", "input": TEXTS}, token)
    assert status == 200, reply
    expected = client.classify("http-critic", TEXTS)
    for got, want in zip(reply["data"], expected):
        assert got["label"] == want.label
        assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-6)
    status, refused = request(address, "POST", "/v1/classify", {"model": "http-embedder", "input": ["hi"]}, token)
    assert status == 400 and "embedding-only" in refused["error"]["message"]
    status, missing = request(address, "POST", "/v1/classify", {"model": "nobody", "input": "hi"}, token)
    assert status == 404 and missing["error"]["code"] == "model_not_found"
    assert request(address, "POST", "/v1/classify", {"input": "hi"}, token)[0] == 400
    assert request(address, "GET", "/health") == (200, {"status": "ok"})
    assert request(address, "GET", "/ready")[1]["status"] == "ready"
    # No Swagger page (its assets come from a public CDN); the OpenAPI document needs a credential.
    assert request(address, "GET", "/docs")[0] == 404
    assert request(address, "GET", "/openapi.json")[0] == 401
    assert "/v1/chat/completions" in request(address, "GET", "/openapi.json", token=token)[1]["paths"]


def raw_request(address: str, body: bytes, token: str, chunked: bool = False) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(address, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        if chunked:
            connection.request("POST", "/v1/completions", body=iter([body]), headers=headers,
                               encode_chunked=True)
        else:
            connection.request("POST", "/v1/completions", body=body, headers=headers)
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read().decode())
    finally:
        connection.close()


def test_http_bad_input_gets_bounded_openai_errors(deployment):
    services, _client, _api = deployment
    address, token = services.http_addr, services.admin_token
    cases = {
        "invalid UTF-8": (b'{"model": "http-bard", "prompt": "\xff\xfe"}', 400),
        "deep nesting": (b'{"model": "http-bard", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
        "max_tokens 2^63": (json.dumps({"model": "http-bard", "prompt": "hi", "max_tokens": 2**63}).encode(), 400),
        "seed 2^70": (json.dumps({"model": "http-bard", "prompt": "hi", "seed": 2**70}).encode(), 400),
        "body over the limit": (json.dumps({"model": "http-bard", "prompt": "x" * (5 << 20)}).encode(), 413),
    }
    for name, (body, status) in cases.items():
        got, reply = raw_request(address, body, token)
        assert got == status, (name, got, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"}, (name, reply)
        assert len(reply["error"]["message"]) < 1200, name
    got, reply = raw_request(address, json.dumps({"model": "http-bard", "prompt": "x" * (5 << 20)}).encode(), token,
                             chunked=True)     # no Content-Length: counted as it arrives
    assert got == 413 and reply["error"]["code"] == "request_too_large"
    status, reply = request(address, "POST", "/v1/classify", {"model": "t" * 10_000, "input": "hi"}, token)
    assert status in (400, 404) and len(reply["error"]["message"]) < 1200


def generated_tokens(services, address: str) -> compute_pb2.StatsResponse:
    with internal_channel(services, address) as channel:
        return compute_pb2_grpc.ComputeStub(channel).Stats(compute_pb2.StatsRequest(), timeout=5)


def test_a_streaming_client_that_goes_away_stops_the_generation(deployment):
    services, _client, _api = deployment
    compute = services.other_compute["gen"]
    before = generated_tokens(services, compute).generated_tokens
    body = {"model": "http-bard", "prompt": "the service was", "max_tokens": 120, "temperature": 1.0, "seed": 1,
            "stream": True}
    connection = http.client.HTTPConnection(services.http_addr, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps(body),
                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {services.admin_token}"})
    reply = connection.getresponse()
    assert reply.status == 200
    assert reply.readline().startswith(b"data: ")
    connection.sock.shutdown(2)
    connection.close()
    deadline = time.monotonic() + 10
    while True:
        stats = generated_tokens(services, compute)
        if stats.generating == 0 and stats.kv_bytes_used == 0:
            break
        assert time.monotonic() < deadline, f"the generation goes on after the client left: {stats}"
        time.sleep(0.05)
    assert stats.generated_tokens - before < 120, "the generation must stop before its end"
