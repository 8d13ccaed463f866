"""OpenAI-compatible routes: the `model` of a request is the tenant id.

/v1/models lists the tenants; /v1/embeddings serves encoder tenants (classifiers and embedding-only ones);
/v1/completions and /v1/chat/completions serve generative tenants (decoders), streamed as server-sent
events in OpenAI's chunk format when `stream` is true. Parameters HMI does not implement are refused with
400 rather than ignored; `top_k` is accepted as an extension (as vLLM does)."""
from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from services.common.errors import HMIError
from services.gateway.core.inference import GeneratedText, GenerateRequest, TextsRequest
from services.gateway.http.auth import Caller
from services.gateway.http.door import ApiError, CallerDep, Door, door_of, now, texts_of
from services.gateway.http.errors import openai_error

router = APIRouter(prefix="/v1", tags=["openai"])
COMPLETIONS_DEFAULT_TOKENS = 16     # OpenAI's default for /v1/completions; chat uses the gateway's default (64)
TENANT_PAGE = 1000


INT32 = 2**31 - 1   # integer fields are range-checked before they reach a protobuf field


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    """What completions and chat completions share."""
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the tenant id")
    max_tokens: int | None = Field(None, ge=-INT32, le=INT32, description="new tokens at most")
    temperature: float | None = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False, description="0 = greedy; default 1")
    top_p: float | None = Field(None, ge=-1e6, le=1e6, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=INT32,
                              description="extension: sample among the k likeliest tokens (0 = off)")
    n: int | None = Field(None, ge=-INT32, le=INT32, description="only 1")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="the same seed gives the same text")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = Field(None, ge=-INT32, le=INT32)
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=-INT32, le=INT32)
    top_logprobs: int | None = Field(None, ge=-INT32, le=INT32)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the tenant id")
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=-INT32, le=INT32)
    user: str | None = None


def _refuse_unsupported(body: SamplingBody) -> None:
    unsupported = {
        "n": body.n not in (None, 1), "presence_penalty": body.presence_penalty not in (None, 0),
        "frequency_penalty": body.frequency_penalty not in (None, 0), "logit_bias": bool(body.logit_bias),
        "logprobs": body.logprobs not in (None, False, 0),
        "echo": getattr(body, "echo", False), "best_of": getattr(body, "best_of", None) not in (None, 1),
        "suffix": bool(getattr(body, "suffix", None)), "tools": bool(getattr(body, "tools", None)),
        "top_logprobs": getattr(body, "top_logprobs", None) not in (None, 0),
        "response_format": (getattr(body, "response_format", None) or {}).get("type", "text") != "text",
    }
    for param, refused in unsupported.items():
        if refused:
            value = "n = 1" if param == "n" else "its default"
            raise ApiError(400, f"{param} is not supported by HMI; leave it at {value}", param, "unsupported_parameter")


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _generate_request(body: SamplingBody, prompt: str, max_tokens: int | None) -> GenerateRequest:
    _refuse_unsupported(body)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    return GenerateRequest(body.model, prompt, max_tokens or 0, 1.0 if body.temperature is None else body.temperature,
                           body.top_k or 0, 1.0 if body.top_p is None else body.top_p, tuple(_stops(body.stop)),
                           None if body.seed is None else body.seed % (1 << 64))


def _strip_stop(text: str, stops: list[str]) -> str:
    """OpenAI's text ends before the stop string (HMI's gRPC API keeps it)."""
    for stop in sorted(stops, key=len, reverse=True):
        if text.endswith(stop):
            return text[:-len(stop)]
    return text


@dataclass
class Generated:
    text: str = ""
    finish_reason: str = "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, message: GeneratedText, stops: list[str]) -> str:
        """Accounts a streamed message; returns its text as OpenAI shows it."""
        self.prompt_tokens = message.prompt_tokens or self.prompt_tokens
        self.completion_tokens += len(message.token_ids)
        text = message.text
        if message.finish_reason:
            self.finish_reason = "stop" if message.finish_reason == "stop" else "length"
            if message.finish_reason == "stop":
                text = _strip_stop(text, stops)
        self.text += text
        return text

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _respond(door: Door, who: Caller, request: GenerateRequest, body: SamplingBody, *, chat: bool):
    stops = list(request.stop)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    created = now()
    stream = door.stream(who, door.inference.generate, request)
    try:
        first = await stream.next()       # a request refused at once gets its HTTP status, not a broken stream
    except HMIError:
        stream.cancel()
        raise
    except BaseException:                 # the client went away while waiting
        stream.cancel()
        raise
    result = Generated()

    def choice(text: str | None, reason: str | None, *, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        data = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": body.model, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return data

    if not body.stream:
        try:
            message = first
            while message is not None:
                result.add(message, stops)
                message = None if message.finish_reason else await stream.next()
        finally:
            stream.cancel()
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                        "finish_reason": result.finish_reason}]
        else:
            choices = [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}]
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": choices, "usage": result.usage()}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        try:
            if chat:
                yield _sse(chunk([choice("", None, role=True)]))
            message = first
            while message is not None:
                text = result.add(message, stops)
                reason = result.finish_reason if message.finish_reason else None
                if text or reason:
                    yield _sse(chunk([choice(text, reason)]))
                message = None if reason else await stream.next()
            if include_usage:
                yield _sse(chunk([], result.usage()))
            yield "data: [DONE]\n\n"
        except HMIError as failure:
            yield _sse(openai_error(failure)[1])
        finally:
            stream.cancel()      # also when the client disconnected: compute stops generating

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/completions", summary="text completion by a generative tenant (OpenAI-compatible)")
async def completions(body: CompletionBody, request: Request, who: CallerDep):
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be one string (several prompts or token arrays are not supported)", "prompt")
    max_tokens = COMPLETIONS_DEFAULT_TOKENS if body.max_tokens is None else body.max_tokens
    return await _respond(door_of(request), who, _generate_request(body, prompt, max_tokens), body, chat=False)


@router.post("/chat/completions", summary="chat completion by a generative tenant (OpenAI-compatible)")
async def chat_completions(body: ChatBody, request: Request, who: CallerDep):
    door = door_of(request)
    messages = []
    for index, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise ApiError(400, f"messages[{index}].content: only text parts are supported", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({"role": message.role, "content": content or ""})
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    prompt = await door.run(who, door.inference.chat_prompt, body.model, messages)
    return await _respond(door, who, _generate_request(body, prompt, max_tokens), body, chat=True)


@router.post("/embeddings", summary="pooled vectors of texts by an encoder tenant (OpenAI-compatible)")
async def embeddings(body: EmbeddingBody, request: Request, who: CallerDep):
    door = door_of(request)
    texts = texts_of(body.input)
    reply = await door.run(who, door.inference.embed, TextsRequest(body.model, tuple(texts)))
    width = len(reply.embeddings[0]) if reply.embeddings else 0
    if body.dimensions is not None and body.dimensions != width:
        raise ApiError(400, f"dimensions must be the tenant's {width} (HMI does not shorten embeddings)",
                       "dimensions")
    data = []
    for index, embedding in enumerate(reply.embeddings):
        if body.encoding_format == "base64":   # little-endian float32, as OpenAI encodes them
            encoded: Any = base64.b64encode(embedding.astype("<f4").tobytes()).decode("ascii")
        else:
            encoded = embedding.tolist()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": body.model,
            "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}


def _model_entry(door: Door, tenant: store_pb.Tenant) -> dict:
    labels = list(tenant.spec.labels)
    task = door.inference.task(tenant.spec.model, labels)
    return {"id": tenant.spec.tenant_id, "object": "model", "created": int(tenant.updated_at), "owned_by": "hmi",
            "task": task, "base_model": tenant.spec.model, "domain": tenant.spec.domain, "labels": labels}


@router.get("/models", summary="the tenants the caller may use (OpenAI-compatible)")
async def list_models(request: Request, who: CallerDep):
    door = door_of(request)
    entries, after = [], ""
    while True:
        page = await door.run(who, door.admin.list_tenants, store_pb.ListTenantsRequest(limit=TENANT_PAGE, after=after))
        entries += [_model_entry(door, tenant) for tenant in page.tenants]
        if len(page.tenants) < TENANT_PAGE:
            break
        after = page.tenants[-1].spec.tenant_id
    return {"object": "list", "data": entries}


@router.get("/models/{model}", summary="one tenant (OpenAI-compatible)")
async def get_model(model: str, request: Request, who: CallerDep):
    door = door_of(request)
    tenant = await door.run(who, door.admin.get_tenant, store_pb.GetTenantRequest(tenant_id=model))
    return _model_entry(door, tenant)
