"""Hugging Face Text Embeddings Inference's routes, for the clients and frameworks that speak TEI.

TEI serves one model per server; here the tenant is named either by the path (`/tei/{tenant}/embed`, so that a
client given the base URL `http://gateway:8000/tei/{tenant}` works unchanged; `POST /tei/{tenant}` is TEI's
root route: embed or predict, as the tenant does) or by a `model` field beside `inputs` (`POST /embed`,
`/predict`, `/tokenize`).

- `/embed` {"inputs": text or texts, "truncate", "normalize" (default true)} -> one vector per text;
- `/predict` {"inputs": text or texts, "raw_scores"} -> labels and scores, likeliest first (a list per text
  when given a list);
- `/tokenize` {"inputs", "add_special_tokens"} -> per text, its tokens with their character spans (a body with
  `prompt` or `messages` instead is vLLM's, answered as vLLM does: vllm_tokens.py);
- `GET /tei/{tenant}/info` -> what the tenant is (embedding model or classifier, its labels).

Errors are TEI's `{"error", "error_type"}` with the status the same failure has on every door (a request that
does not validate: 422, as TEI answers)."""
from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from services.common.errors import FailedPrecondition
from services.gateway.core.inference import TextsRequest
from services.gateway.http import vllm_tokens
from services.gateway.http.door import ApiError, CallerDep, door_of, texts_of

PREFIX = "/tei"
ROUTES = ("/embed", "/predict", "/tokenize", "/decode")
router = APIRouter(tags=["tei"])
ERROR_TYPES = {401: "Unauthorized", 403: "Unauthorized", 404: "NotFound", 413: "Validation", 422: "Validation",
               429: "Overloaded", 503: "Unhealthy", 504: "Overloaded"}


def serves(path: str) -> bool:
    return path in ROUTES or path == PREFIX or path.startswith(PREFIX + "/")


def error_response(status: int, message: str, _type: str, _code: str | None, _param: str | None) -> JSONResponse:
    status = 422 if status == 400 else status          # TEI answers a request that does not validate with 422
    return JSONResponse({"error": message, "error_type": ERROR_TYPES.get(status, "Backend")}, status_code=status)


class TenantBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="the tenant id (routes without a tenant in the path)")


class TeiBody(TenantBody):
    inputs: str | list[str] = Field(description="one text or a list of texts (pairs are not supported)")


class EmbedBody(TeiBody):
    truncate: bool = False
    normalize: bool = True


class PredictBody(TeiBody):
    raw_scores: bool = False
    truncate: bool = False


class RootBody(TeiBody):
    """TEI's root route takes what /embed and /predict take."""
    truncate: bool = False
    normalize: bool = True
    raw_scores: bool = False


class TokenizeBody(TenantBody):
    """TEI's body (`inputs`), or vLLM's (`prompt` or `messages`: answered in vLLM's shape, vllm_tokens.py)."""
    inputs: str | list[str] | None = Field(None, description="TEI: one text or a list of texts")
    add_special_tokens: bool = True
    prompt: str | None = Field(None, description="vLLM: one text")
    messages: list[dict] | None = Field(None, description="vLLM: a chat, rendered with the tenant's chat template")


class DecodeBody(TenantBody):
    ids: list[int] | list[list[int]] = Field(description="token ids, or a list of sequences of them")
    skip_special_tokens: bool = True


def _tenant(path_tenant: str | None, body: TenantBody) -> str:
    tenant = path_tenant or body.model
    if not tenant:
        raise ApiError(400, "name the tenant: POST /tei/{tenant}/... or a `model` field beside `inputs` (`ids` on "
                            "/decode)", "model")
    return tenant


async def _embed(request: Request, who, tenant: str, body: EmbedBody) -> list[list[float]]:
    door = door_of(request)
    reply = await door.run(who, door.inference.embed, TextsRequest(tenant, tuple(texts_of(body.inputs, "inputs")),
                                                                   body.truncate))
    vectors = []
    for vector in reply.embeddings:
        if body.normalize:
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        vectors.append(vector.tolist())
    return vectors


async def _predict(request: Request, who, tenant: str, body: PredictBody) -> list:
    door = door_of(request)
    reply = await door.run(who, door.inference.classify,
                           TextsRequest(tenant, tuple(texts_of(body.inputs, "inputs")), body.truncate))
    ranked = []
    for result in reply.results:
        scores = result.logits if body.raw_scores else result.probabilities
        ranked.append(sorted(({"label": label, "score": float(score)} for label, score in zip(result.labels, scores)),
                             key=lambda entry: -entry["score"]))
    return ranked[0] if isinstance(body.inputs, str) else ranked


async def _tokenize(request: Request, who, tenant: str, body: TokenizeBody) -> list:
    door = door_of(request)
    tokens = await door.run(who, door.inference.tokenize, tenant, texts_of(body.inputs, "inputs"),
                            body.add_special_tokens)
    return [[{"id": t.id, "text": t.text, "special": t.special, "start": t.start, "stop": t.stop} for t in text]
            for text in tokens]


@router.post("/embed", summary="a vector per text (TEI; the tenant in `model`)")
@router.post(PREFIX + "/{tenant}/embed", summary="a vector per text (TEI)")
async def embed(body: EmbedBody, request: Request, who: CallerDep, tenant: str | None = None):
    return await _embed(request, who, _tenant(tenant, body), body)


@router.post("/predict", summary="labels and scores per text of a classifier tenant (TEI; the tenant in `model`)")
@router.post(PREFIX + "/{tenant}/predict", summary="labels and scores per text of a classifier tenant (TEI)")
async def predict(body: PredictBody, request: Request, who: CallerDep, tenant: str | None = None):
    return await _predict(request, who, _tenant(tenant, body), body)


@router.post("/tokenize", summary="the tokens of each text (TEI; the tenant in `model`)")
@router.post(PREFIX + "/{tenant}/tokenize", summary="the tokens of each text (TEI)")
async def tokenize(body: TokenizeBody, request: Request, who: CallerDep, tenant: str | None = None):
    if body.inputs is None:
        return await vllm_tokens.tokenize(request, who, _tenant(tenant, body), body.prompt, body.messages,
                                          body.add_special_tokens)
    return await _tokenize(request, who, _tenant(tenant, body), body)


@router.post("/decode", summary="the text of token ids (TEI; the tenant in `model`)")
@router.post(PREFIX + "/{tenant}/decode", summary="the text of token ids (TEI)")
async def decode(body: DecodeBody, request: Request, who: CallerDep, tenant: str | None = None) -> list[str]:
    door = door_of(request)
    single = bool(body.ids) and not isinstance(body.ids[0], list)
    sequences = [body.ids] if single else body.ids
    return await door.run(who, door.inference.detokenize, _tenant(tenant, body), sequences,
                          body.skip_special_tokens)


async def _record(request: Request, who, tenant: str) -> store_pb.Tenant:
    door = door_of(request)
    return await door.run(who, door.admin.get_tenant, store_pb.GetTenantRequest(tenant_id=tenant))


@router.post(PREFIX + "/{tenant}", summary="TEI's root route: embed or predict, as the tenant does")
async def tenant_root(tenant: str, body: RootBody, request: Request, who: CallerDep):
    record = await _record(request, who, tenant)
    task = door_of(request).inference.task(record.spec.model, record.spec.labels)
    if task == "classify":
        return await _predict(request, who, tenant, PredictBody(inputs=body.inputs, raw_scores=body.raw_scores,
                                                                truncate=body.truncate))
    if task == "embed":
        return await _embed(request, who, tenant, EmbedBody(inputs=body.inputs, truncate=body.truncate,
                                                            normalize=body.normalize))
    raise FailedPrecondition(f"tenant {tenant!r} generates text: use /v1/completions")


@router.get(PREFIX + "/{tenant}/info", summary="what the tenant is (TEI)")
async def info(tenant: str, request: Request, who: CallerDep) -> dict:
    door = door_of(request)
    record = await _record(request, who, tenant)
    task = door.inference.task(record.spec.model, record.spec.labels)
    lane = door.inference.lanes.get(record.spec.model or door.inference.default_model)
    if task == "classify":
        model_type = {"classifier": {"id2label": {str(i): label for i, label in enumerate(record.spec.labels)},
                                     "label2id": {label: i for i, label in enumerate(record.spec.labels)}}}
    else:
        model_type = {"embedding": {"pooling": "mean"}}
    return {"model_id": tenant, "model_sha": str(record.adapter_version), "model_dtype": "float32",
            "model_type": model_type, "max_input_length": lane.encoder.max_sequence_tokens if lane else 0,
            "max_client_batch_size": lane.encoder.max_texts if lane else 0, "version": "hmi-1",
            "base_model": record.spec.model, "domain": record.spec.domain, "task": task}
