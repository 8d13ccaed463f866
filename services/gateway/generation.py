"""Text generation at the gateway: request limits, prompt tokens, and the streamed text (incremental
detokenisation and stop strings). No gRPC here; the servicer feeds it compute's token stream."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.gateway.settings import GenerationLimits
from services.gateway.structured_output import output_pattern

DEFAULT_NEW_TOKENS = 64
MAX_SESSION_CHARS = 256
MIN_KV_BUDGET = 16      # one KV block


@dataclass(frozen=True)
class GenerationPlan:
    """A validated request: what compute is asked for."""
    prompt_ids: np.ndarray
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    logprobs: int | None = None         # alternatives per generated token (None: no log-probabilities)
    prompt_logprobs: bool = False       # the prompt's tokens' log-probabilities too
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    output_pattern: str = ""            # structured output: the regex the generated text must match
    session_id: str = ""                # the conversation it continues (which compute replica serves it)
    kv_budget: int = 0                  # KV tokens kept per layer and head once decoding; 0 = all


def plan_generation(tokenizer, request, limits: GenerationLimits, *, max_positions: int,
                    eos_token_ids: tuple[int, ...]) -> GenerationPlan:
    """Checks every parameter against its limit, with a message that names the limit. A request with
    `prompt_ids` (token ids of the model's own tokenizer) skips tokenising."""
    token_prompt = getattr(request, "prompt_ids", None)
    if token_prompt is None and not request.prompt.strip():
        raise InvalidArgument("the prompt is empty")
    if token_prompt is None and len(request.prompt) > limits.max_prompt_chars:
        raise InvalidArgument(f"the prompt has {len(request.prompt)} characters, above the limit of "
                              f"{limits.max_prompt_chars}")
    new_tokens = request.max_new_tokens or DEFAULT_NEW_TOKENS
    if not 1 <= new_tokens <= limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens must lie in 1..{limits.max_new_tokens}, got {request.max_new_tokens}")
    if not math.isfinite(request.temperature) or not 0.0 <= request.temperature <= 100.0:
        raise InvalidArgument(f"temperature must lie in [0, 100] (0 = greedy), got {request.temperature}")
    if request.top_k < 0:
        raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {request.top_k}")
    if not math.isfinite(request.top_p) or not 0.0 <= request.top_p <= 1.0:
        raise InvalidArgument(f"top_p must lie in [0, 1] (0 or 1 = off), got {request.top_p}")
    penalties = {name: float(getattr(request, name, 0.0)) for name in ("presence_penalty", "frequency_penalty")}
    for name, value in penalties.items():
        if not math.isfinite(value) or not -2.0 <= value <= 2.0:
            raise InvalidArgument(f"{name} must lie in [-2, 2] (0 = off), got {value}")
    repetition = float(getattr(request, "repetition_penalty", 1.0))   # the gRPC door maps its unset 0 to 1
    if not math.isfinite(repetition) or not 0.0 < repetition <= 2.0:
        raise InvalidArgument(f"repetition_penalty must lie in (0, 2] (1 = off), got {repetition}")
    stop = tuple(request.stop)
    if len(stop) > limits.max_stop_strings or any(not s or len(s) > limits.max_stop_chars for s in stop):
        raise InvalidArgument(f"give at most {limits.max_stop_strings} stop strings of 1..{limits.max_stop_chars} "
                              f"characters each")
    if token_prompt is not None:
        vocab = tokenizer.get_vocab_size()
        if not token_prompt:
            raise InvalidArgument("the prompt is empty (no token ids)")
        if min(token_prompt) < 0 or max(token_prompt) >= vocab:
            raise InvalidArgument(f"prompt token ids must lie in [0, {vocab}) (the model's tokenizer)")
        prompt_ids = np.asarray(token_prompt, dtype=np.int32)
    else:
        prompt_ids = np.asarray(tokenizer.encode(request.prompt).ids, dtype=np.int32)
    top = getattr(request, "logprobs", None)
    if top is not None and not 0 <= top <= limits.max_top_logprobs:
        raise InvalidArgument(f"logprobs must lie in 0..{limits.max_top_logprobs}: at most {limits.max_top_logprobs} "
                              f"alternatives per token, got {top}")
    truncate = getattr(request, "truncate_prompt_tokens", 0)
    if truncate < 0:
        raise InvalidArgument(f"truncate_prompt_tokens must be >= 0 (0 = keep the whole prompt), got {truncate}")
    if truncate:
        prompt_ids = prompt_ids[-truncate:]
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise InvalidArgument(f"the prompt is {len(prompt_ids)} tokens long, above the limit of "
                              f"{limits.max_prompt_tokens} tokens")
    if len(prompt_ids) + new_tokens > max_positions:
        raise InvalidArgument(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({new_tokens}) exceeds the "
                              f"model's {max_positions} positions; shorten the prompt or lower max_new_tokens")
    seed = secrets.randbits(63) if request.seed is None else request.seed
    stop_ids = () if getattr(request, "ignore_eos", False) else eos_token_ids
    session_id = getattr(request, "session_id", "") or ""
    if len(session_id) > MAX_SESSION_CHARS or not session_id.isprintable():
        raise InvalidArgument(f"session_id must be at most {MAX_SESSION_CHARS} printable characters")
    kv_budget = int(getattr(request, "kv_budget", 0) or 0)
    if kv_budget and not MIN_KV_BUDGET <= kv_budget <= max_positions:
        raise InvalidArgument(f"kv_budget must be 0 (every token) or {MIN_KV_BUDGET}..{max_positions} tokens, got "
                              f"{kv_budget}")
    output = getattr(request, "output_format", None)
    pattern = output_pattern(output) if output is not None else ""
    if pattern and not stop_ids:
        raise InvalidArgument("structured output ends at the end-of-text token once the text is complete: it "
                              "cannot be combined with ignore_eos" if eos_token_ids else
                              "structured output needs the model's end-of-text token, which this model does not name")
    return GenerationPlan(prompt_ids, new_tokens, float(request.temperature), int(request.top_k),
                          float(request.top_p) if request.top_p > 0 else 1.0, seed, stop, stop_ids, top,
                          bool(getattr(request, "prompt_logprobs", False)), repetition_penalty=repetition,
                          output_pattern=pattern, session_id=session_id, kv_budget=kv_budget, **penalties)


def generation_affinity(tenant_id: str, session_id: str = "") -> str:
    """What picks a generation's compute replica (rendezvous hashing, router.py): the tenant, so that its
    requests share their prefix cache on one replica; with a session id, the tenant's conversation, so that a
    busy tenant's conversations spread over the replicas while each one's turns stay where its KV is."""
    return tenant_id if not session_id else f"{tenant_id}\x00{session_id}"


class TextStreamer:
    """Turns token ids into text pieces as they arrive.

    Decodes everything generated so far and emits what is new, holding back an incomplete UTF-8
    character (shown as U+FFFD) and any tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0              # characters of the decoded text already emitted
        self.stopped = False

    def add(self, token_ids: list[int]) -> str:
        """New text to send now ('' if nothing is certain yet); sets `stopped` after a stop string."""
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            found = text.find(stop, max(0, self.sent - len(stop) + 1))
            if found >= 0:
                self.stopped = True
                text = text[:found + len(stop)]
                piece, self.sent = text[self.sent:], len(text)
                return piece
        safe = len(text)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        for stop in self.stop:   # a suffix that is a prefix of a stop string waits for the next token
            for size in range(min(len(stop) - 1, safe - self.sent), 0, -1):
                if stop.startswith(text[safe - size:safe]):
                    safe -= size
                    break
        piece, self.sent = text[self.sent:safe], max(self.sent, safe)
        return piece

    def flush(self) -> str:
        """What is left when generation ends."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.sent = text[self.sent:], len(text)
        return piece
