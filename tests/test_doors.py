"""The KServe v2 (Open Inference Protocol) and TEI doors, against real processes: each answers what the gRPC
API answers for the same tenant and input (tested with tritonclient and huggingface_hub, the protocols' own
clients, where they install, and with plain HTTP), and a bad input gets the same status and message through
every door, because every door calls the same core."""
from __future__ import annotations

import json
import struct
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from services.gateway.core.call import Call, Cancellation
from tests.helpers import expect_status

pytestmark = pytest.mark.integration
TEXTS = ["the service was quick and friendly", "rain is expected tomorrow"]


@pytest.fixture(scope="module")
def doors(front_door):
    client = front_door.client(timeout=60)
    client.build_domain("door-reviews", "", split_layer=0, context=1, min_count=1)
    client.build_domain("door-stories", "", split_layer=0, context=1, min_count=1, model="gen")
    client.register_tenant("door-critic", "door-reviews", ["neg", "pos"], seed=11)
    client.register_tenant("door-embedder", "door-reviews", [], seed=12)
    client.register_tenant("door-bard", "door-stories", [], seed=13)
    yield front_door, client
    client.close()


def post(services, path: str, body, *, token: str | None = "admin", headers: dict | None = None,
         raw: bytes | None = None) -> tuple[int, object, dict]:
    """(status, JSON body, headers) of a POST (GET when body is None and raw is None)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://{services.http_addr}{path}", data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {services.admin_token if token == 'admin' else token}")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), dict(error.headers)


# ---- KServe v2 ---------------------------------------------------------------------------------


def test_kserve_health_metadata_and_infer_over_plain_http(doors):
    services, client = doors
    assert post(services, "/v2/health/live", None, token=None)[0] == 200
    assert post(services, "/v2/health/ready", None, token=None)[:2] == (200, {"ready": True})
    status, metadata, _ = post(services, "/v2/models/door-critic", None)
    assert status == 200 and metadata["platform"] == "hmi-classify"
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities", "embedding"]
    version = metadata["versions"][0]
    assert post(services, f"/v2/models/door-critic/versions/{version}/ready", None)[0] == 200
    status, body, _ = post(services, "/v2/models/door-critic/versions/999/ready", None)
    assert status == 404 and "current adapter version" in body["error"]

    request = {"id": "r1", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS}],
               "outputs": [{"name": "probabilities"}, {"name": "label"}]}
    status, reply, _ = post(services, "/v2/models/door-critic/infer", request)
    assert status == 200 and reply["id"] == "r1" and reply["model_version"] == version
    assert [o["name"] for o in reply["outputs"]] == ["probabilities", "label"]
    expected = client.classify("door-critic", TEXTS)
    assert reply["outputs"][1]["data"] == [r.label for r in expected]
    probabilities = np.array(reply["outputs"][0]["data"]).reshape(reply["outputs"][0]["shape"])
    np.testing.assert_allclose(probabilities, [[r.probabilities[k] for k in ("neg", "pos")] for r in expected],
                               atol=1e-6)

    # An embedding-only tenant answers its embedding by default, equal to gRPC's.
    request = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": [[TEXTS[0]], [TEXTS[1]]]}]}
    status, reply, _ = post(services, "/v2/models/door-embedder/infer", request)
    assert status == 200 and reply["outputs"][0]["name"] == "embedding"
    got = np.array(reply["outputs"][0]["data"]).reshape(reply["outputs"][0]["shape"])
    np.testing.assert_allclose(got, client.embed("door-embedder", TEXTS), atol=1e-6)


def test_kserve_binary_inputs_and_generation(doors):
    services, client = doors
    packed = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in TEXTS)
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(packed)}}],
                         "outputs": [{"name": "label"}]}).encode()
    status, reply, _ = post(services, "/v2/models/door-critic/infer", None, raw=header + packed,
                            headers={"Inference-Header-Content-Length": str(len(header)),
                                     "Content-Type": "application/octet-stream"})
    assert status == 200, reply
    assert reply["outputs"][0]["data"] == [r.label for r in client.classify("door-critic", TEXTS)]

    request = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["the service was"]}],
               "parameters": {"max_tokens": 8, "temperature": 0}}
    status, reply, _ = post(services, "/v2/models/door-bard/infer", request)
    assert status == 200, reply
    expected = client.generate("door-bard", "the service was", max_new_tokens=8).collect().text
    assert reply["outputs"] == [{"name": "text_output", "datatype": "BYTES", "shape": [1], "data": [expected]}]

    for bad, message in [({"inputs": []}, "exactly one input"),
                         ({"inputs": [{"name": "t", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "BYTES"),
                         ({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}, "shape"),
                         ({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                           "outputs": [{"name": "logits"}]}, "no output logits")]:
        status, reply, _ = post(services, "/v2/models/door-critic/infer", bad)
        assert status == 400 and message in reply["error"], reply
    status, reply, _ = post(services, "/v2/models/door-critic/infer", None, raw=b"{not json")
    assert status == 400 and "not JSON" in reply["error"]
    assert post(services, "/v2/models/door-critic/infer", {"inputs": []}, token=None)[0] == 401


def test_tritonclient_speaks_to_the_kserve_door(doors):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")
    services, client = doors
    headers = {"Authorization": f"Bearer {services.admin_token}"}
    triton = httpclient.InferenceServerClient(url=services.http_addr)
    try:
        assert triton.is_server_live() and triton.is_server_ready()
        assert triton.is_model_ready("door-critic", headers=headers)
        assert triton.get_model_metadata("door-critic", headers=headers)["name"] == "door-critic"
        text = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))   # binary by default
        result = triton.infer("door-critic", [text], headers=headers,
                              outputs=[httpclient.InferRequestedOutput("label"),
                                       httpclient.InferRequestedOutput("embedding")])
        labels = [value.decode() if isinstance(value, bytes) else value for value in result.as_numpy("label")]
        assert labels == [r.label for r in client.classify("door-critic", TEXTS)]
        np.testing.assert_allclose(result.as_numpy("embedding"), client.embed("door-critic", TEXTS), atol=1e-6)
        from tritonclient.utils import InferenceServerException
        with pytest.raises(InferenceServerException, match="not registered"):
            triton.infer("nobody", [text], headers=headers)
    finally:
        triton.close()


# ---- TEI --------------------------------------------------------------------------------------


def test_tei_routes_equal_grpc(doors):
    services, client = doors
    expected = np.array(client.embed("door-embedder", TEXTS))
    status, vectors, _ = post(services, "/tei/door-embedder/embed", {"inputs": TEXTS, "normalize": False})
    assert status == 200
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    status, vectors, _ = post(services, "/embed", {"model": "door-embedder", "inputs": TEXTS[0]})
    assert status == 200 and len(vectors) == 1
    np.testing.assert_allclose(vectors[0], expected[0] / np.linalg.norm(expected[0]), atol=1e-6)

    classified = client.classify("door-critic", TEXTS)
    status, ranked, _ = post(services, "/tei/door-critic/predict", {"inputs": TEXTS[0]})
    assert status == 200 and ranked[0]["label"] == classified[0].label
    assert ranked[0]["score"] >= ranked[1]["score"]
    assert {e["label"]: e["score"] for e in ranked} == pytest.approx(classified[0].probabilities, abs=1e-6)
    status, batch, _ = post(services, "/predict", {"model": "door-critic", "inputs": TEXTS, "raw_scores": True})
    assert status == 200 and len(batch) == 2 and [b[0]["label"] for b in batch] == [r.label for r in classified]
    status, root, _ = post(services, "/tei/door-critic", {"inputs": TEXTS[1]})     # TEI's root route
    assert status == 200 and root[0]["label"] == classified[1].label

    status, tokens, _ = post(services, "/tei/door-bard/tokenize", {"inputs": ["the service was"],
                                                                   "add_special_tokens": False})
    assert status == 200 and "".join(t["text"] for t in tokens[0]).replace(" ", "") == "theservicewas"
    assert all(not t["special"] and t["stop"] > t["start"] for t in tokens[0])
    ids = [t["id"] for t in tokens[0]]
    status, texts, _ = post(services, "/tei/door-bard/decode", {"ids": ids})
    assert status == 200 and texts == ["the service was"]
    status, texts, _ = post(services, "/decode", {"model": "door-bard", "ids": [ids, ids[:1]]})
    assert status == 200 and texts == ["the service was", tokens[0][0]["text"]]
    status, body, _ = post(services, "/tei/door-bard/decode", {"ids": [10 ** 9]})
    assert status == 422 and "not a token id of the base model" in body["error"]
    # vLLM's shapes: /tokenize with `prompt` or `messages`, /detokenize
    status, counted, _ = post(services, "/tokenize", {"model": "door-bard", "prompt": "the service was",
                                                      "add_special_tokens": False})
    assert status == 200 and counted["tokens"] == ids and counted["count"] == len(ids)
    assert counted["max_model_len"] > len(ids)
    status, chat, _ = post(services, "/tokenize", {"model": "door-bard",
                                                   "messages": [{"role": "user", "content": "the service was"}]})
    assert status == 200 and chat["count"] == len(chat["tokens"]) > len(ids), chat    # the template's tokens too
    status, back, _ = post(services, "/detokenize", {"model": "door-bard", "tokens": chat["tokens"]})
    assert status == 200 and "the service was" in back["prompt"]
    status, back, _ = post(services, "/detokenize", {"model": "door-bard", "tokens": ids})
    assert status == 200 and back == {"prompt": "the service was"}
    status, body, _ = post(services, "/detokenize", {"model": "door-bard", "tokens": [10 ** 9]})
    assert status == 400 and "not a token id of the base model" in body["error"]["message"]
    status, body, _ = post(services, "/tokenize", {"model": "door-bard"})
    assert status == 422 and "`prompt` or `messages`" in body["error"]
    status, info, _ = post(services, "/tei/door-critic/info", None)
    assert status == 200 and info["model_type"]["classifier"]["id2label"] == {"0": "neg", "1": "pos"}

    status, body, _ = post(services, "/embed", {"inputs": "no tenant"})
    assert status == 422 and body["error_type"] == "Validation" and "name the tenant" in body["error"]
    status, body, _ = post(services, "/tei/door-embedder/predict", {"inputs": "hi"})
    assert status == 422 and "embedding-only" in body["error"]
    assert post(services, "/tei/door-embedder/embed", {"inputs": "hi"}, token="hmi_bad")[0] == 401


def test_grpc_tokenize_and_detokenize_answer_what_the_http_routes_do(doors):
    services, client = doors
    status, counted, _ = post(services, "/tokenize", {"model": "door-bard", "prompt": "the service was",
                                                      "add_special_tokens": False})
    assert status == 200
    answer = client.tokenize("door-bard", ["the service was", "rain"], special_tokens=False)
    first = answer.texts[0]
    assert list(first.ids) == counted["tokens"] and answer.max_model_len == counted["max_model_len"]
    assert [("the service was"[a:b]) for a, b in zip(first.starts, first.ends)] == [p for p in first.pieces]
    assert not any(first.special) and len(answer.texts) == 2
    assert client.detokenize("door-bard", [list(first.ids), list(answer.texts[1].ids)]) == ["the service was", "rain"]
    # an encoder tenant: its [CLS] and [SEP] are there unless asked away, and detokenize drops them unless kept
    with_specials = client.tokenize("door-critic", ["the service was"]).texts[0]
    assert list(with_specials.special) == [True] + [False] * (len(with_specials.ids) - 2) + [True]
    assert with_specials.pieces[0] == "[CLS]" and with_specials.starts[0] == with_specials.ends[0] == 0
    bare = client.tokenize("door-critic", ["the service was"], special_tokens=False).texts[0]
    assert list(bare.ids) == list(with_specials.ids)[1:-1]
    assert client.detokenize("door-critic", [list(with_specials.ids)]) == ["the service was"]
    assert client.detokenize("door-critic", [list(with_specials.ids)], keep_special_tokens=True) == [
        "[CLS] the service was [SEP]"]
    # bad input: the same messages as the HTTP routes
    assert "not a token id of the base model" in expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, client.detokenize, "door-bard", [[10 ** 9]])
    assert "at least one" in expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.tokenize, "door-bard", [])
    assert "at least one" in expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.detokenize, "door-bard", [])
    expect_status(grpc.StatusCode.NOT_FOUND, client.tokenize, "no-such-tenant", ["hi"])


def test_huggingface_inference_client_reads_the_tei_door(doors, monkeypatch):
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")
    # The tests run with HF_HUB_OFFLINE (nothing may reach a hub); this client talks to the local gateway only.
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    services, client = doors
    inference = hub.InferenceClient(model=f"http://{services.http_addr}/tei/door-embedder",
                                    token=services.admin_token)
    got = np.asarray(inference.feature_extraction(TEXTS[0], normalize=False))
    np.testing.assert_allclose(got.reshape(-1), client.embed("door-embedder", TEXTS[:1])[0], atol=1e-5)


# ---- one core behind every door ------------------------------------------------------------------


def test_the_same_bad_input_fails_alike_through_every_door(doors):
    services, client = doors
    grpc_message = expect_status(grpc.StatusCode.INVALID_ARGUMENT, client.embed, "door-embedder", ["   "])
    assert "text 0 is empty" in grpc_message
    openai_status, body, _ = post(services, "/v1/embeddings", {"model": "door-embedder", "input": ["   "]})
    assert (openai_status, body["error"]["message"]) == (400, grpc_message)
    tei_status, body, _ = post(services, "/tei/door-embedder/embed", {"inputs": ["   "]})
    assert (tei_status, body["error"]) == (422, grpc_message)
    kserve_status, body, _ = post(services, "/v2/models/door-embedder/infer",
                                  {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["   "]}]})
    assert (kserve_status, body["error"]) == (400, grpc_message)

    missing = expect_status(grpc.StatusCode.NOT_FOUND, client.classify, "nobody", ["hi"])
    assert post(services, "/v1/classify", {"model": "nobody", "input": "hi"})[1]["error"]["message"] == missing
    assert post(services, "/v2/models/nobody/infer", {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1],
                                                                 "data": ["hi"]}]})[:2] == (404, {"error": missing})
    assert post(services, "/predict", {"model": "nobody", "inputs": "hi"})[1]["error"] == missing


def test_a_cancellation_fires_once_and_late_callbacks_run_at_once():
    fired: list[str] = []
    cancellation = Cancellation()
    cancellation.add_callback(lambda: fired.append("early"))
    cancellation.fire()
    cancellation.fire()
    cancellation.add_callback(lambda: fired.append("late"))
    assert fired == ["early", "late"] and cancellation.fired
    assert Call(deadline=None).timeout(7.0) == 7.0
    assert 0.05 <= Call(deadline=2.0).timeout(30.0) <= 2.0
