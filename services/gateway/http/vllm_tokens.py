"""vLLM's token routes, for the clients that count or check tokens against a vLLM server (benchmark harnesses,
prompt budgeting): `/tokenize` {"model", "prompt" or "messages", "add_special_tokens"} -> {"count",
"max_model_len", "tokens"} and `/detokenize` {"model", "tokens"} -> {"prompt"}. `/tokenize` is also TEI's
route (`inputs` instead of `prompt`): tei.py hands vLLM's bodies here. The model is the tenant, as on every
OpenAI-compatible route; the tokenizer is its base model's."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.http.door import ApiError, CallerDep, door_of

router = APIRouter(tags=["vllm"])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | None = None


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the tenant id")
    tokens: list[int] = Field(description="token ids of the tenant's base model")


async def tokenize(request: Request, who, tenant: str, prompt: str | None, messages: list[dict] | None,
                   add_special_tokens: bool) -> dict:
    """vLLM's answer: the prompt's (or the chat's, through the tenant's chat template) token ids and count."""
    door = door_of(request)
    if (prompt is None) == (messages is None):
        raise ApiError(400, "give `inputs` (TEI), or either `prompt` or `messages` (vLLM)", "prompt")
    if messages is not None:
        checked = [ChatMessage.model_validate(message) for message in messages]
        prompt = await door.run(who, door.inference.chat_prompt, tenant,
                                [{"role": m.role, "content": m.content or ""} for m in checked])
        add_special_tokens = False          # the template wrote the model's special tokens already
    tokens = (await door.run(who, door.inference.tokenize, tenant, [prompt], add_special_tokens))[0]
    limit = await door.run(who, door.inference.token_limit, tenant)
    return {"count": len(tokens), "max_model_len": limit, "tokens": [token.id for token in tokens]}


@router.post("/detokenize", summary="the text of token ids (vLLM's route; the tenant in `model`)")
async def detokenize(body: DetokenizeBody, request: Request, who: CallerDep) -> dict:
    door = door_of(request)
    texts = await door.run(who, door.inference.detokenize, body.model, [body.tokens], False)
    return {"prompt": texts[0]}
