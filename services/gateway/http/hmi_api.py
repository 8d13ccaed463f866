"""HMI's own HTTP route: /v1/classify, label and probabilities per text of a classifier tenant."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.core.inference import TextsRequest
from services.gateway.http.door import CallerDep, door_of, texts_of

router = APIRouter(prefix="/v1", tags=["hmi"])


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the tenant id")
    input: str | list[str] = Field(description="one text or a list of texts")
    truncate: bool = Field(False, description="keep the head of an over-long text instead of refusing it")


@router.post("/classify", summary="label and probabilities per text (a classifier tenant)")
async def classify(body: ClassifyBody, request: Request, who: CallerDep) -> dict:
    door = door_of(request)
    texts = texts_of(body.input)
    reply = await door.run(who, door.inference.classify, TextsRequest(body.model, tuple(texts), body.truncate))
    data = [{"index": i, "label": r.label, "probabilities": dict(zip(r.labels, map(float, r.probabilities)))}
            for i, r in enumerate(reply.results)]
    return {"object": "list", "model": body.model, "data": data,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}
