"""The Open Inference Protocol (KServe v2), what Triton and KServe clients speak: a tenant is a model.

- `GET /v2/health/live`, `GET /v2/health/ready`: 200 when true, 400 when not (the protocol's 4xx); no credential.
- `GET /v2`: server metadata; `GET /v2/models/{tenant}[/versions/{v}]`: the tenant's inputs and outputs;
  `GET /v2/models/{tenant}[/versions/{v}]/ready`; the version is the tenant's adapter version.
- `POST /v2/models/{tenant}[/versions/{v}]/infer`: one BYTES input of texts. Encoder tenants answer `label`
  (BYTES) and `probabilities` (FP32 [n, labels]) when they classify, `embedding` (FP32 [n, hidden]) when asked for
  or when they only embed; decoder tenants answer `text_output` (BYTES) per prompt, sampled as the request's
  `parameters` say (max_tokens, temperature, top_k, top_p, seed, stop).
  Inputs may use the binary tensor extension (`Inference-Header-Content-Length`, as tritonclient sends by
  default); outputs are always JSON, which every client reads.

Errors are `{"error": "<message>"}` with the status the same failure has on every door."""
from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from services.common.errors import InvalidArgument, NotFound, quoted
from services.gateway.core.call import Call
from services.gateway.core.inference import GenerateRequest, Inference, TextsRequest
from services.gateway.http.door import CallerDep, Door, door_of

PREFIX = "/v2"
router = APIRouter(prefix=PREFIX, tags=["kserve-v2"])
BINARY_HEADER = "inference-header-content-length"
SAMPLING = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}


def serves(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_response(status: int, message: str, _type: str, _code: str | None, _param: str | None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@router.get("/health/live", summary="liveness (KServe v2)")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="readiness (KServe v2): the store and compute for every model answer")
async def ready(request: Request):
    is_ready = door_of(request).ready()
    return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 400)


@router.get("", summary="server metadata (KServe v2)")
async def server_metadata(_who: CallerDep) -> dict:
    return {"name": "hmi", "version": "1", "extensions": ["binary_tensor_data"]}


def _tensor(name: str, datatype: str, shape: list[int]) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape}


async def _tenant(door: Door, who, tenant: str, version: str | None) -> store_pb.Tenant:
    record = await door.run(who, door.admin.get_tenant, store_pb.GetTenantRequest(tenant_id=tenant))
    if version is not None and version != str(record.adapter_version):
        raise NotFound(f"tenant {quoted(tenant)} has no version {quoted(version)}: its current adapter version is "
                       f"{record.adapter_version} (leave the version out to use the current one)")
    return record


def _metadata(door: Door, record: store_pb.Tenant) -> dict:
    task = door.inference.task(record.spec.model, record.spec.labels)
    labels = len(record.spec.labels)
    if task == "generate":
        inputs, outputs = [_tensor("text_input", "BYTES", [-1])], [_tensor("text_output", "BYTES", [-1])]
    else:
        inputs = [_tensor("text", "BYTES", [-1])]
        outputs = [_tensor("embedding", "FP32", [-1, -1])]
        if task == "classify":
            outputs = [_tensor("label", "BYTES", [-1]), _tensor("probabilities", "FP32", [-1, labels])] + outputs
    return {"name": record.spec.tenant_id, "versions": [str(record.adapter_version)], "platform": f"hmi-{task}",
            "inputs": inputs, "outputs": outputs}


@router.get("/models/{tenant}", summary="a tenant's inputs and outputs (KServe v2)")
@router.get("/models/{tenant}/versions/{version}", include_in_schema=False)
async def model_metadata(tenant: str, request: Request, who: CallerDep, version: str | None = None) -> dict:
    door = door_of(request)
    return _metadata(door, await _tenant(door, who, tenant, version))


@router.get("/models/{tenant}/ready", summary="whether a tenant can be served now (KServe v2)")
@router.get("/models/{tenant}/versions/{version}/ready", include_in_schema=False)
async def model_ready(tenant: str, request: Request, who: CallerDep, version: str | None = None):
    door = door_of(request)
    await _tenant(door, who, tenant, version)
    is_ready = door.ready()
    return JSONResponse({"name": tenant, "ready": is_ready}, status_code=200 if is_ready else 400)


def _texts(tensor: dict, raw: bytes | None) -> list[str]:
    """The strings of a BYTES input tensor, from JSON `data` or from its binary part."""
    name = quoted(tensor.get("name", ""))
    if tensor.get("datatype") != "BYTES":
        raise InvalidArgument(f"input {name} must have datatype BYTES (texts), not {quoted(tensor.get('datatype'))}")
    if raw is not None:
        texts, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidArgument(f"input {name}: its binary data ends inside an element's length")
            (size,) = struct.unpack_from("<I", raw, at)
            if at + 4 + size > len(raw):
                raise InvalidArgument(f"input {name}: an element of {size} bytes runs past its binary data")
            texts.append(raw[at + 4:at + 4 + size])
            at += 4 + size
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise InvalidArgument(f"input {name} needs `data`: a list of strings")
        try:
            texts = list(np.asarray(data, dtype=object).reshape(-1)) if data else []
        except ValueError:
            raise InvalidArgument(f"input {name}: `data` is not a rectangular list of strings") from None
    try:
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    except UnicodeDecodeError:
        raise InvalidArgument(f"input {name} holds bytes that are not UTF-8 text") from None
    if not all(isinstance(t, str) for t in texts):
        raise InvalidArgument(f"input {name}: every element must be a string")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or \
            int(np.prod(shape)) != len(texts):
        raise InvalidArgument(f"input {name}: shape {quoted(shape)} does not hold its {len(texts)} elements")
    return texts


def parse_infer(body: bytes, header_length: str | None) -> tuple[dict, list[str]]:
    """The request's JSON and the texts of its one input."""
    raw_part = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidArgument(f"Inference-Header-Content-Length must be a number, not "
                                  f"{quoted(header_length)}") from None
        if not 0 < length <= len(body):
            raise InvalidArgument(f"Inference-Header-Content-Length {length} does not fit the body of {len(body)} "
                                  f"bytes")
        body, raw_part = body[:length], body[length:]
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"the inference request is not JSON: {error}") from None
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InvalidArgument("give exactly one input: a BYTES tensor of texts (prompts for a generative tenant)")
    tensor = inputs[0]
    parameters = tensor.get("parameters") or {}
    raw = None
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or not 0 <= size <= len(raw_part):
            raise InvalidArgument(f"binary_data_size {quoted(size)} does not fit the {len(raw_part)} bytes of binary "
                                  f"data")
        raw = raw_part[:size]
    return document, _texts(tensor, raw)


def _requested(document: dict) -> list[str] | None:
    outputs = document.get("outputs")
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InvalidArgument("outputs must be a list of {\"name\": ...}")
    return [o["name"] for o in outputs]


def _sampling(document: dict, prompt: str, tenant: str) -> GenerateRequest:
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidArgument("parameters must be an object")
    values: dict[str, Any] = {}
    for key, kind in SAMPLING.items():
        if key in parameters:
            value = parameters[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise InvalidArgument(f"parameter {key} must be a {kind.__name__}, not {quoted(value)}")
            values[key] = kind(value)
    stop = parameters.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidArgument("parameter stop must be a string or a list of strings")
    return GenerateRequest(tenant, prompt, values.get("max_tokens", 0), values.get("temperature", 1.0),
                           values.get("top_k", 0), values.get("top_p", 1.0), tuple(stop), values.get("seed"))


def infer(inference: Inference, call: Call, tenant: str, document: dict, texts: list[str]) -> tuple[int, list[dict]]:
    """(adapter version, output tensors) of one inference request."""
    requested = _requested(document)
    route = inference.route(call, tenant, "Infer")
    task = inference.task(route.model, route.labels)
    if task == "generate":
        unknown = sorted(set(requested or ()) - {"text_output"})
        if unknown:
            raise InvalidArgument(f"tenant {quoted(tenant)} generates text: its only output is text_output, not "
                                  f"{', '.join(unknown)}")
        outputs = ["".join(piece.text for piece in inference.generate(call, _sampling(document, prompt, tenant)))
                   for prompt in texts]
        return route.adapter_version, [{**_tensor("text_output", "BYTES", [len(outputs)]), "data": outputs}]
    known = {"label", "probabilities", "embedding"} if task == "classify" else {"embedding"}
    wanted = requested if requested is not None else (["label", "probabilities"] if task == "classify"
                                                      else ["embedding"])
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise InvalidArgument(f"tenant {quoted(tenant)} has no output {', '.join(unknown)}: it has "
                              f"{', '.join(sorted(known))}")
    request = TextsRequest(tenant, tuple(texts), bool((document.get("parameters") or {}).get("truncate", False)))
    tensors: list[dict] = []
    version = route.adapter_version
    if "label" in wanted or "probabilities" in wanted:
        classified = inference.classify(call, request)
        version = classified.version
        probabilities = [list(r.probabilities) for r in classified.results]
        if "label" in wanted:
            tensors.append({**_tensor("label", "BYTES", [len(texts)]), "data": [r.label for r in classified.results]})
        if "probabilities" in wanted:
            width = len(probabilities[0]) if probabilities else 0
            tensors.append({**_tensor("probabilities", "FP32", [len(texts), width]),
                            "data": [p for row in probabilities for p in row]})
    if "embedding" in wanted:
        embedded = inference.embed(call, request)
        version = embedded.version
        width = len(embedded.embeddings[0]) if embedded.embeddings else 0
        tensors.append({**_tensor("embedding", "FP32", [len(texts), width]),
                        "data": np.concatenate(embedded.embeddings).tolist() if embedded.embeddings else []})
    order = {name: index for index, name in enumerate(wanted)}
    return version, sorted(tensors, key=lambda t: order[t["name"]])


@router.post("/models/{tenant}/infer", summary="texts in, labels, probabilities, embeddings or text out (KServe v2)")
@router.post("/models/{tenant}/versions/{version}/infer", include_in_schema=False)
async def model_infer(tenant: str, request: Request, who: CallerDep, version: str | None = None) -> dict:
    door = door_of(request)
    document, texts = parse_infer(await request.body(), request.headers.get(BINARY_HEADER))
    if version is not None:
        await _tenant(door, who, tenant, version)
    answered_version, outputs = await door.run(who, lambda call: infer(door.inference, call, tenant, document, texts))
    reply = {"model_name": tenant, "model_version": str(answered_version), "outputs": outputs}
    if isinstance(document.get("id"), str):
        reply["id"] = document["id"]
    return reply
