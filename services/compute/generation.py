"""Continuous batching for generative tenants: one engine thread runs decoder steps over every running
sequence; new requests join and finished or cancelled ones leave between steps (token granularity).

KV memory has a budget: a request is admitted when its whole cache (prompt + max new tokens) fits, so
a running sequence never runs out; otherwise it waits, and past `max_waiting` submit refuses it
(RESOURCE_EXHAUSTED). Each request samples with its own seeded generator, so the same seed gives the
same text whatever else shares its steps.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from kernels.lora import find_segments
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.compute.adapter_pool import AdapterPool
from services.compute.decoder_model import DecoderModel, KVCache, StepInputs, cache_bytes_per_token

log = logging.getLogger("hmi.compute.generation")

# (domain, token windows, first position of each window, leading context-only tokens per window)
#   -> layer-L rows (fp16) of each window's other tokens
PlotLookup = Callable[[str, list[np.ndarray], list[int], list[int]], list[np.ndarray]]
PLOT_WINDOW = 16   # tokens sent for a generated token's lookup: itself and its left context (the deepest k)
PREFILL_CHUNK_MIN = 16   # prompt tokens a step feeds even when decoding sequences fill its budget


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class GenerationRequest:
    tenant_id: str
    adapter_version: int
    domain: str
    split_layer: int
    prompt: np.ndarray                # int token ids
    params: SamplingParams


@dataclass
class StreamEvent:
    token_id: int | None = None
    finish_reason: str | None = None  # "length", "stop", "cancelled"
    error: BaseException | None = None


class TokenStream:
    """The caller's side: token ids as they are produced, then the finish reason (or the error)."""

    def __init__(self) -> None:
        self._events: queue.Queue[StreamEvent] = queue.Queue()
        self._cancelled = threading.Event()
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.submitted_at = time.monotonic()

    def __iter__(self) -> Iterator[int]:
        while True:
            event = self._events.get()
            if event.error is not None:
                raise event.error
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
                return
            yield event.token_id

    def cancel(self) -> None:
        """Stops generation at the next step and frees the sequence's KV cache (a client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, event: StreamEvent) -> None:
        if event.token_id is not None and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._events.put(event)


@dataclass(eq=False)   # identity: the engine finds a sequence in its lists by object
class _Sequence:
    request: GenerationRequest
    stream: TokenStream
    kv_bytes: int
    cache: KVCache | None = None
    tokens: list[int] = field(default_factory=list)      # prompt + generated
    pending: list[int] = field(default_factory=list)     # fed at the next step
    generated: int = 0
    generator: torch.Generator | None = None
    prompt_rows: Future | None = None                     # PLOT rows of the prompt, fetched ahead
    prompt_rows_left: np.ndarray | None = None            # ... those of prompt tokens not fed yet (chunked prefill)
    adapter_ready: Future | None = None                   # the adapter in compute's host cache


@dataclass
class EngineStats:
    steps: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    largest_step: int = 0           # most tokens one step fed (bounded by max_step_tokens: chunked prefill)
    running: int = 0
    waiting: int = 0
    kv_bytes_used: int = 0
    kv_budget_bytes: int = 0


class GenerationEngine:
    def __init__(self, model: DecoderModel, pool: AdapterPool, plot: PlotLookup | None, *, kv_budget_bytes: int,
                 max_waiting: int = 256, max_running: int = 64, max_step_tokens: int = 128) -> None:
        self.model = model
        # Chunked prefill: a step feeds at most this many tokens (every decoding sequence's one first, prompts
        # share the rest), so a long prompt joining the batch delays the others' next token by a bounded step.
        self.max_step_tokens = max(1, max_step_tokens)
        self.pool = pool
        self.plot = plot
        self.kv_budget_bytes = kv_budget_bytes
        self.max_waiting = max_waiting
        self.max_running = max_running
        self.stats = EngineStats(kv_budget_bytes=kv_budget_bytes)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._kv_used = 0
        self._cond = threading.Condition()
        self._stop = False
        self._prefetch = ThreadPoolExecutor(max_workers=4, thread_name_prefix="plot-prefetch")
        self._thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self._thread.start()

    # ---- public ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> TokenStream:
        dims = self.model.dims
        params = request.params
        length = len(request.prompt) + params.max_new_tokens
        if not len(request.prompt):
            raise InvalidArgument("the prompt is empty")
        if length > dims.max_positions:
            raise InvalidArgument(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                  f"exceeds the model's {dims.max_positions} positions")
        if not 0 <= request.split_layer < dims.layers:
            raise InvalidArgument(f"split layer {request.split_layer} is outside [0, {dims.layers})")
        if request.split_layer > 0 and self.plot is None:
            raise FailedPrecondition("this compute replica has no knowledge store for PLOT lookups")
        kv_bytes = length * cache_bytes_per_token(dims, dims.layers - request.split_layer)
        if kv_bytes > self.kv_budget_bytes:
            raise ResourceExhausted(f"this request needs {kv_bytes >> 20} MiB of KV cache, more than compute's whole "
                                    f"budget of {self.kv_budget_bytes >> 20} MiB: lower max_new_tokens or the prompt")
        sequence = _Sequence(request, TokenStream(), kv_bytes, tokens=[int(t) for t in request.prompt],
                             pending=[int(t) for t in request.prompt])
        sequence.generator = torch.Generator().manual_seed(params.seed)
        self._check_room()   # before fetching anything for a request that would be refused
        # The adapter and the prompt's PLOT rows stream in while earlier requests' steps run.
        sequence.adapter_ready = self._prefetch.submit(self.pool.prefetch,
                                                       (request.tenant_id, request.adapter_version))
        if request.split_layer > 0:
            prompt = np.asarray(request.prompt, dtype=np.int32)
            sequence.prompt_rows = self._prefetch.submit(self.plot, request.domain, [prompt], [0], [0])
        with self._cond:
            self._check_room()
            self._waiting.append(sequence)
            self._cond.notify()
        return sequence.stream

    def _check_room(self) -> None:
        with self._cond:
            if self._stop:
                raise FailedPrecondition("the generation engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise ResourceExhausted(f"{len(self._waiting)} generation requests are already waiting for KV "
                                        f"cache; back off and retry")

    def snapshot(self) -> EngineStats:
        with self._cond:
            self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)
            self.stats.kv_bytes_used = self._kv_used
            return EngineStats(**vars(self.stats))

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)
        self._prefetch.shutdown(wait=False, cancel_futures=True)

    # ---- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._running and not self._waiting:
                    self._cond.wait()
                if self._stop:
                    for sequence in list(self._running) + list(self._waiting):
                        sequence.stream._put(StreamEvent(error=FailedPrecondition("compute is shutting down")))
                    return
                self._drop_cancelled()
                self._admit()
                running = list(self._running)
            if not running:
                time.sleep(0.005)   # only waiting requests (for room, or their adapter and prompt rows)
                continue
            try:
                self._step(running)
            except Exception as error:  # noqa: BLE001 - the step's sequences fail, the engine goes on
                log.exception("generation step of %d sequences failed", len(running))
                with self._cond:
                    for sequence in running:
                        sequence.stream._put(StreamEvent(error=error))
                        self._finish(sequence)

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._running if s.stream.cancelled]:
            sequence.stream._put(StreamEvent(finish_reason="cancelled"))
            self._finish(sequence)
        kept = [s for s in self._waiting if not s.stream.cancelled]
        for sequence in self._waiting:
            if sequence.stream.cancelled:
                sequence.stream._put(StreamEvent(finish_reason="cancelled"))
        self._waiting = deque(kept)

    def _admit(self) -> None:
        """First come, first served: the head of the queue waits for room (and for its adapter and prompt
        rows, fetched since submit) rather than being overtaken. A request whose fetch failed fails alone."""
        while self._waiting and len(self._running) < self.max_running:
            sequence = self._waiting[0]
            fetches = [f for f in (sequence.adapter_ready, sequence.prompt_rows) if f is not None]
            if not all(f.done() for f in fetches):
                return
            failed = next((f.exception() for f in fetches if f.exception() is not None), None)
            if failed is not None:
                self._waiting.popleft()
                sequence.stream._put(StreamEvent(error=failed))
                continue
            if self._kv_used + sequence.kv_bytes > self.kv_budget_bytes:
                return
            self._waiting.popleft()
            request = sequence.request
            sequence.cache = self.model.new_cache(request.split_layer,
                                                  len(request.prompt) + request.params.max_new_tokens)
            self._kv_used += sequence.kv_bytes
            self._running.append(sequence)

    def _finish(self, sequence: _Sequence) -> None:
        if sequence in self._running:
            self._running.remove(sequence)
            self._kv_used -= sequence.kv_bytes
            sequence.cache = None

    def _feeds(self, running: list[_Sequence]) -> dict[_Sequence, int]:
        """Tokens each sequence feeds this step: a decoding sequence its one token; prompts, in arrival order,
        what is left of the step's token budget (the first prompt always gets at least one chunk)."""
        feeds = {s: len(s.pending) for s in running if s.generated > 0}
        budget = self.max_step_tokens - sum(feeds.values())
        for sequence in running:
            if sequence.generated == 0:
                take = min(len(sequence.pending), max(budget, 0))
                if take == 0 and not any(feeds.get(s) for s in running if s.generated == 0):
                    take = min(len(sequence.pending), PREFILL_CHUNK_MIN)   # progress even under many decodes
                if take:
                    feeds[sequence] = take
                    budget -= take
        return feeds

    @torch.inference_mode()
    def _step(self, running: list[_Sequence]) -> None:
        feeds = self._feeds(running)
        running = [s for s in running if feeds.get(s)]
        lease = self.pool.acquire([(s.request.tenant_id, s.request.adapter_version) for s in running])
        try:
            order = sorted(running, key=lambda s: (s.request.split_layer,
                                                   lease.slots[(s.request.tenant_id, s.request.adapter_version)]))
            fed = [feeds[s] for s in order]
            hidden, bounds = self._inputs(order, fed)
            slots = [lease.slots[(s.request.tenant_id, s.request.adapter_version)] for s in order]
            per_token = [slot for slot, n in zip(slots, fed) for _ in range(n)]
            inputs = StepInputs(hidden=hidden, seq_bounds=bounds, entry_layers=[s.request.split_layer for s in order],
                                caches=[s.cache for s in order], segments=find_segments(per_token, bounds))
            out = self.model.run(inputs, self.pool.lora_a, self.pool.lora_b)
            last = torch.tensor([end - 1 for end in bounds[1:]], device=out.device)
            logits = self.model.logits(out[last]).float().cpu()
        finally:
            lease.release()
        with self._cond:
            self.stats.steps += 1
            self.stats.prompt_tokens += sum(n for s, n in zip(order, fed) if s.generated == 0)
            self.stats.largest_step = max(self.stats.largest_step, sum(fed))
            for j, sequence in enumerate(order):
                sequence.pending = sequence.pending[fed[j]:]
                if sequence.pending:
                    continue        # the rest of its prompt comes in the next steps: nothing to sample yet
                token = sample(logits[j], sequence.request.params, sequence.generator)
                sequence.generated += 1
                sequence.tokens.append(token)
                sequence.pending = [token]
                self.stats.tokens_generated += 1
                sequence.stream._put(StreamEvent(token_id=token))
                params = sequence.request.params
                reason = ("stop" if token in params.stop_token_ids
                          else "length" if sequence.generated >= params.max_new_tokens else None)
                if reason is not None:
                    sequence.stream._put(StreamEvent(finish_reason=reason))
                    self._finish(sequence)

    def _inputs(self, order: list[_Sequence], lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The first `lengths[j]` pending tokens of every sequence at its entry layer: embeddings at split layer
        0, else PLOT rows by context (a prompt's were prefetched at submit; a generated token's come in one
        lookup per domain)."""
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tolist()
        hidden = torch.empty(bounds[-1], self.model.dims.hidden, device=self.model.device)
        embed = [j for j, s in enumerate(order) if s.request.split_layer == 0]
        if embed:
            ids = torch.tensor([t for j in embed for t in order[j].pending[:lengths[j]]], device=self.model.device)
            positions = torch.tensor([order[j].cache.length + i for j in embed for i in range(lengths[j])],
                                     device=self.model.device)
            rows = self.model.embed(ids, positions)
            cursor = 0
            for j in embed:
                hidden[bounds[j]:bounds[j + 1]] = rows[cursor:cursor + lengths[j]]
                cursor += lengths[j]
        by_domain: dict[str, list[int]] = {}
        for j, sequence in enumerate(order):
            if sequence.request.split_layer == 0:
                continue
            if sequence.prompt_rows is not None:
                sequence.prompt_rows_left = np.asarray(sequence.prompt_rows.result()[0], np.float32)
                sequence.prompt_rows = None
            if sequence.prompt_rows_left is not None:
                rows, sequence.prompt_rows_left = (sequence.prompt_rows_left[:lengths[j]],
                                                   sequence.prompt_rows_left[lengths[j]:])
                if not len(sequence.prompt_rows_left):
                    sequence.prompt_rows_left = None
                hidden[bounds[j]:bounds[j + 1]] = torch.from_numpy(rows).to(hidden.device)
            else:
                by_domain.setdefault(sequence.request.domain, []).append(j)
        for domain, members in by_domain.items():
            windows, firsts, skips = [], [], []
            for j in members:
                tokens = order[j].tokens
                start = max(0, len(tokens) - PLOT_WINDOW)
                windows.append(np.asarray(tokens[start:], dtype=np.int32))
                firsts.append(start)
                skips.append(len(tokens) - start - lengths[j])
            for j, rows in zip(members, self.plot(domain, windows, firsts, skips)):
                hidden[bounds[j]:bounds[j + 1]] = torch.from_numpy(np.asarray(rows, np.float32)).to(hidden.device)
        return hidden, bounds


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else temperature, then top-k, then top-p (nucleus), drawn with the request's
    own generator."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.double() / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, index = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p   # keep the smallest set reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, index, drop), float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
