"""OpenAI-compatible routes: the `model` of a request is the tenant id.

/v1/models lists the tenants; /v1/embeddings serves encoder tenants (classifiers and embedding-only ones);
/v1/completions and /v1/chat/completions serve generative tenants (decoders), streamed as server-sent
events in OpenAI's chunk format when `stream` is true. Parameters HMI does not implement are refused with
400 rather than ignored; `top_k` is accepted as an extension (as vLLM does)."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from services.common.errors import HMIError, InvalidArgument
from services.gateway.core.inference import GeneratedText, GenerateRequest, TextsRequest, TokenLogprobs
from services.gateway.http.auth import Caller
from services.gateway.http.door import ApiError, CallerDep, Door, door_of, now, texts_of
from services.gateway.http.errors import openai_error
from services.gateway.structured_output import from_openai

router = APIRouter(prefix="/v1", tags=["openai"])
MAX_CHOICES = 16                    # n times the prompts of one request
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
    n: int | None = Field(None, ge=-INT32, le=INT32, description=f"choices per prompt (choices in all: at most "
                          f"{MAX_CHOICES})")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="the same seed gives the same text")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, allow_inf_nan=False, description="[-2, 2]: lowers every token "
                                           "already generated (0 = off)")
    frequency_penalty: float | None = Field(None, allow_inf_nan=False, description="[-2, 2]: lowers each token "
                                            "by how often it was generated (0 = off)")
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None
    # vLLM's extensions that clients send: served ones, then refused ones (never silently ignored)
    ignore_eos: bool = Field(False, description="extension: generate max_tokens tokens, past end-of-text")
    include_stop_str_in_output: bool = Field(False, description="extension: keep the stop string in the text")
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=INT32,
                                               description="extension: keep only the prompt's last k tokens")
    repetition_penalty: float | None = Field(None, allow_inf_nan=False, description="extension, (0, 2]: divides "
                                             "the logits of prompt and generated tokens (1 = off)")
    min_tokens: int | None = Field(None, ge=-INT32, le=INT32)
    length_penalty: float | None = Field(None, allow_inf_nan=False)
    min_p: float | None = Field(None, allow_inf_nan=False)
    use_beam_search: bool = False
    prompt_logprobs: int | None = Field(None, ge=-INT32, le=INT32)
    response_format: dict[str, Any] | None = Field(None, description="structured output: {\"type\": \"json_object\"} "
                                                   "or {\"type\": \"json_schema\", \"json_schema\": {\"schema\": ...}}")
    guided_json: Any = Field(None, description="extension (vLLM's): the output follows this JSON schema")
    guided_regex: str | None = Field(None, description="extension (vLLM's): the output matches this regex")
    guided_choice: list[str] | None = Field(None, description="extension (vLLM's): the output is one of these")
    guided_grammar: str | None = None
    kv_budget: int | None = Field(None, ge=-INT32, le=INT32, description="extension: keep only so many tokens' "
                                  "KV per layer and head once decoding (heavy hitters + recent; 0 = all)")
    session_id: str | None = Field(None, description="extension: the conversation this request continues (at most "
                                   "256 printable characters); its turns are served by one compute replica, which "
                                   "keeps the KV of the turns before")


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


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the tenant id")
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=-INT32, le=INT32)
    user: str | None = None
    truncate: bool = Field(False, description="extension (TEI's): keep the head of an over-long text instead of "
                           "refusing it")


def _refuse_unsupported(body: SamplingBody) -> None:
    unsupported = {
        "logit_bias": bool(body.logit_bias),
        "best_of": getattr(body, "best_of", None) not in (None, 1),
        "suffix": bool(getattr(body, "suffix", None)), "tools": bool(getattr(body, "tools", None)),
        "min_tokens": body.min_tokens not in (None, 0),
        "length_penalty": body.length_penalty not in (None, 1), "min_p": body.min_p not in (None, 0),
        "use_beam_search": body.use_beam_search, "prompt_logprobs": body.prompt_logprobs is not None,
        "guided_grammar": body.guided_grammar is not None,
    }
    for param, refused in unsupported.items():
        if refused:
            raise ApiError(400, f"{param} is not supported by HMI; leave it at its default", param,
                           "unsupported_parameter")


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _generate_request(body: SamplingBody, max_tokens: int | None, logprobs: int | None,
                      echo: bool) -> GenerateRequest:
    """The request every choice starts from (its prompt and seed are set per choice)."""
    _refuse_unsupported(body)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    try:
        output = from_openai(body.response_format, body.guided_json, body.guided_regex, body.guided_choice)
    except InvalidArgument as error:
        raise ApiError(400, str(error), "response_format") from None
    return GenerateRequest(body.model, "", max_tokens or 0, 1.0 if body.temperature is None else body.temperature,
                           body.top_k or 0, 1.0 if body.top_p is None else body.top_p, tuple(_stops(body.stop)),
                           None if body.seed is None else body.seed % (1 << 64), ignore_eos=body.ignore_eos,
                           truncate_prompt_tokens=body.truncate_prompt_tokens or 0, logprobs=logprobs,
                           prompt_logprobs=echo, presence_penalty=body.presence_penalty or 0.0,
                           frequency_penalty=body.frequency_penalty or 0.0,
                           repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                           output_format=output, session_id=body.session_id or "", kv_budget=body.kv_budget or 0)


def _logprob_request(body: SamplingBody) -> tuple[int | None, bool]:
    """(alternatives per token, None: no log-probabilities; whether the prompt is echoed with its own). How
    many alternatives may be asked for is the core's to check, as for every door."""
    if isinstance(body, ChatBody):
        if body.logprobs not in (None, False, True):
            raise ApiError(400, "logprobs must be true or false on chat completions", "logprobs")
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        wanted, echo = (top if body.logprobs else None), False
    else:
        if body.logprobs is not None and (isinstance(body.logprobs, bool) or not isinstance(body.logprobs, int)):
            raise ApiError(400, "logprobs must be an integer: how many alternatives per token (0 = the token's "
                                "own only)", "logprobs")
        wanted, echo = body.logprobs, body.echo
    if echo and body.stream:
        raise ApiError(400, "echo is answered on requests without stream", "stream")
    return wanted, echo


def _completion_logprobs(entries: list[TokenLogprobs], offset: int) -> dict:
    """OpenAI's completions `logprobs` of `entries`: tokens, their log-probabilities, the alternatives and the
    character offset of each token, the first at `offset`."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token.text)
    return {"tokens": [e.token.text for e in entries], "token_logprobs": [e.token.logprob for e in entries],
            "top_logprobs": [None if e.token.logprob is None else {t.text: t.logprob for t in e.top}
                             for e in entries], "text_offset": offsets}


def _chat_logprobs(entries: list[TokenLogprobs]) -> dict:
    def one(choice) -> dict:
        return {"token": choice.text, "logprob": choice.logprob, "bytes": list(choice.text.encode())}
    return {"content": [{**one(e.token), "top_logprobs": [one(t) for t in e.top]} for e in entries]}


def _prompts(prompt) -> list[str | tuple[int, ...]]:
    """A completion's prompts: a string, strings, token ids of the model's tokenizer, or lists of them."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [tuple(prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if prompt and all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        return [tuple(p) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                        "(none of them empty)", "prompt")


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
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    def add(self, message: GeneratedText, stops: list[str]) -> str:
        """Accounts a streamed message; returns its text as OpenAI shows it."""
        self.prompt_tokens = message.prompt_tokens or self.prompt_tokens
        self.completion_tokens += len(message.token_ids)
        self.logprobs += message.logprobs or []
        self.prompt_logprobs += message.prompt_logprobs or []
        text = message.text
        if message.finish_reason:
            self.finish_reason = "stop" if message.finish_reason == "stop" else "length"
            if message.finish_reason == "stop":
                text = _strip_stop(text, stops)
        self.text += text
        return text


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class Choice:
    """One choice's stream of the core: opened at once, so that a request refused before any text gets its HTTP
    status rather than a broken stream."""

    def __init__(self, door: Door, who: Caller, request: GenerateRequest, index: int, keep_stop: bool = False) -> None:
        self.index = index
        self.request = request
        self.stops = [] if keep_stop else list(request.stop)     # OpenAI's text ends before the stop string
        self.stream = door.stream(who, door.inference.generate, request)
        self.result = Generated()
        self.first = None

    async def open(self) -> None:
        try:
            self.first = await self.stream.next()
        except BaseException:             # refused, or the client went away while waiting
            self.stream.cancel()
            raise

    async def pieces(self):
        """(text as OpenAI shows it, finish reason or None, the message's token log-probabilities) per message,
        ending with the finish."""
        message = self.first
        while message is not None:
            text = self.result.add(message, self.stops)
            reason = self.result.finish_reason if message.finish_reason else None
            yield text, reason, message.logprobs or []
            message = None if reason else await self.stream.next()

    def cancel(self) -> None:
        self.stream.cancel()


def _usage(choices: list[Choice], per_prompt: int) -> dict:
    """Prompt tokens once per prompt (its first choice), generated tokens of every choice."""
    prompt = sum(c.result.prompt_tokens for c in choices if c.index % per_prompt == 0)
    completion = sum(c.result.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _respond(door: Door, who: Caller, requests: list[GenerateRequest], body: SamplingBody, *, chat: bool,
                   per_prompt: int = 1, score_only: bool = False):
    """`requests`: one per choice, in OpenAI's order (prompt by prompt, `per_prompt` choices each); `score_only`:
    echo with max_tokens 0, the prompt and its log-probabilities without a completion."""
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
    created = now()
    choices = [Choice(door, who, request, index, body.include_stop_str_in_output)
               for index, request in enumerate(requests)]
    try:
        await asyncio.gather(*(choice.open() for choice in choices))
    except BaseException:
        for choice in choices:
            choice.cancel()
        raise

    def piece(index: int, text: str | None, reason: str | None, *, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}

    def streamed_logprobs(choice: Choice, entries: list[TokenLogprobs], offset: int) -> dict | None:
        """The log-probabilities of the tokens a chunk carries (those of held-back text come with the next)."""
        if choice.request.logprobs is None:
            return None
        return _chat_logprobs(entries) if chat else _completion_logprobs(entries, offset)

    def chunk(pieces: list[dict], usage: dict | None = None) -> dict:
        data = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": body.model, "choices": pieces}
        if usage is not None:
            data["usage"] = usage
        return data

    if not body.stream:
        async def collect(choice: Choice) -> None:
            async for _text, _reason, _logprobs in choice.pieces():
                pass

        try:
            await asyncio.gather(*(collect(choice) for choice in choices))
        finally:
            for choice in choices:
                choice.cancel()
        if chat:
            answers = [{"index": c.index, "message": {"role": "assistant", "content": c.result.text},
                        "logprobs": _chat_logprobs(c.result.logprobs) if c.request.logprobs is not None else None,
                        "finish_reason": c.result.finish_reason} for c in choices]
        else:
            answers = []
            for c in choices:
                echo = c.request.prompt_logprobs
                prompt_text = (c.request.prompt if c.request.prompt_ids is None
                               else "".join(e.token.text for e in c.result.prompt_logprobs))
                completion = "" if score_only else c.result.text
                entries = (c.result.prompt_logprobs if echo else []) + ([] if score_only else c.result.logprobs)
                logprobs = (_completion_logprobs(entries, 0 if echo else len(prompt_text))
                            if c.request.logprobs is not None else None)
                answers.append({"index": c.index, "text": (prompt_text if echo else "") + completion,
                                "logprobs": logprobs, "finish_reason": c.result.finish_reason})
            if score_only:
                for c in choices:
                    c.result.completion_tokens = 0
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": answers, "usage": _usage(choices, per_prompt)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        try:
            for choice in choices:       # one choice after the other, each chunk naming its index
                if chat:
                    yield _sse(chunk([piece(choice.index, "", None, role=True)]))
                held: list[TokenLogprobs] = []
                offset = len(choice.request.prompt)
                async for text, reason, logprobs in choice.pieces():
                    held += logprobs
                    if text or reason:
                        found = streamed_logprobs(choice, held, offset)
                        offset += sum(len(e.token.text) for e in held)
                        held = []
                        yield _sse(chunk([piece(choice.index, text, reason, logprobs=found)]))
                choice.cancel()
            if include_usage:
                yield _sse(chunk([], _usage(choices, per_prompt)))
            yield "data: [DONE]\n\n"
        except HMIError as failure:
            yield _sse(openai_error(failure)[1])
        finally:
            for choice in choices:       # also when the client disconnected: compute stops generating
                choice.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _choices(body: SamplingBody, prompts: list[str | tuple[int, ...]], max_tokens: int | None) -> list[GenerateRequest]:
    """One request per choice: each prompt `n` times; with a seed, choice j of a prompt samples with seed + j (the
    same request gives the same texts, and the choices differ)."""
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES or len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"n ({n}) times the prompts ({len(prompts)}) must lie in 1..{MAX_CHOICES} choices per "
                            f"request; send more requests", "n")
    top, echo = _logprob_request(body)
    if echo and max_tokens == 0:
        max_tokens = 1                  # echo alone scores the prompt: one token is generated and left out
    base = _generate_request(body, max_tokens, top, echo)
    requests = []
    for prompt in prompts:
        for j in range(n):
            seed = None if base.seed is None else (base.seed + j) % (1 << 64)
            if isinstance(prompt, str):
                requests.append(dataclasses.replace(base, prompt=prompt, seed=seed))
            else:
                requests.append(dataclasses.replace(base, prompt="", prompt_ids=prompt, seed=seed))
    return requests


@router.post("/completions", summary="text completion by a generative tenant (OpenAI-compatible)")
async def completions(body: CompletionBody, request: Request, who: CallerDep):
    prompts = _prompts(body.prompt)
    max_tokens = COMPLETIONS_DEFAULT_TOKENS if body.max_tokens is None else body.max_tokens
    return await _respond(door_of(request), who, _choices(body, prompts, max_tokens), body, chat=False,
                          per_prompt=body.n or 1, score_only=body.echo and max_tokens == 0)


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
    return await _respond(door, who, _choices(body, [prompt], max_tokens), body, chat=True, per_prompt=body.n or 1)


@router.post("/embeddings", summary="pooled vectors of texts by an encoder tenant (OpenAI-compatible)")
async def embeddings(body: EmbeddingBody, request: Request, who: CallerDep):
    door = door_of(request)
    texts = texts_of(body.input)
    reply = await door.run(who, door.inference.embed, TextsRequest(body.model, tuple(texts), body.truncate))
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
