"""Scheduling for continuous batching of generative tenants: which requests run, which wait, and how many
tokens each running sequence feeds the next step. Plain Python, no tensors: a policy can be read and
tested apart from the model (the step runner, generation_steps.py, does the tensor work).

- Queue: fair across tenants (services/common/fair_queue.py: start-time fair queuing by tokens, prompt +
  max new tokens, weighted by the tenant's priority), first come first served within a tenant, so one tenant's
  burst cannot hold the others back by its length; past `max_waiting` a submit is refused (RESOURCE_EXHAUSTED).
- Admission: the head of the queue (in that fair order) is admitted once its fetches (adapter, prompt rows) are
  done and its whole KV cache (prompt + max new tokens) fits the budget, so a running sequence never runs out;
  it is never overtaken. A request whose fetch failed fails alone.
- Chunked prefill: a step feeds at most `max_step_tokens`: every decoding sequence's one token first, then
  prompts in arrival order share the rest (the first prompt always gets a chunk), so a long prompt delays
  the others' next token by a bounded step.
- Cancellation: a cancelled stream leaves between steps and frees its KV budget.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from services.common.errors import FailedPrecondition, ResourceExhausted
from services.common.fair_queue import FairQueue

PREFILL_CHUNK_MIN = 16   # prompt tokens a step feeds even when decoding sequences fill its budget


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False            # report each generated token's log-probability
    top_logprobs: int = 0             # and its so many likeliest alternatives
    prompt_logprobs: bool = False     # and the prompt's tokens' (with the first generated token)


@dataclass
class GenerationRequest:
    tenant_id: str
    adapter_version: int
    domain: str
    split_layer: int
    prompt: np.ndarray                # int token ids
    params: SamplingParams
    weight: float = 1.0               # the tenant's share of the queue (its priority)


@dataclass
class StreamEvent:
    token_id: int | None = None
    finish_reason: str | None = None  # "length", "stop", "cancelled"
    error: BaseException | None = None
    details: Any = None               # what the step runner reported with the token (its log-probabilities)


class TokenStream:
    """The caller's side: token ids as they are produced, then the finish reason (or the error)."""

    def __init__(self) -> None:
        self._events: queue.Queue[StreamEvent] = queue.Queue()
        self._cancelled = threading.Event()
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.submitted_at = time.monotonic()

    def __iter__(self) -> Iterator[int]:
        for token_id, _details in self.with_details():
            yield token_id

    def with_details(self) -> Iterator[tuple[int, Any]]:
        """(token id, what the step runner reported with it: None unless log-probabilities were asked for)."""
        while True:
            event = self._events.get()
            if event.error is not None:
                raise event.error
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
                return
            yield event.token_id, event.details

    def cancel(self) -> None:
        """Stops generation at the next step and frees the sequence's KV cache (a client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def put(self, event: StreamEvent) -> None:
        """The scheduler's side: one more event for the caller."""
        if event.token_id is not None and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self._events.put(event)


@dataclass(eq=False)   # identity: the scheduler finds a sequence in its lists by object
class ScheduledSequence:
    request: GenerationRequest
    stream: TokenStream
    kv_bytes: int                                          # its whole KV cache: prompt + max new tokens
    tokens: list[int] = field(default_factory=list)        # prompt + generated
    pending: list[int] = field(default_factory=list)       # not fed yet: the prompt's rest, or the last token
    generated: int = 0
    adapter_ready: Future | None = None                    # the adapter in compute's host cache
    prompt_rows: Future | None = None                      # PLOT rows of the prompt, fetched ahead
    state: object | None = None                            # the step runner's (KV cache, sampler) while running

    @classmethod
    def of(cls, request: GenerationRequest, kv_bytes: int) -> ScheduledSequence:
        prompt = [int(t) for t in request.prompt]
        return cls(request, TokenStream(), kv_bytes, tokens=prompt, pending=list(prompt))

    @property
    def decoding(self) -> bool:
        """Past its prompt: it feeds one generated token per step."""
        return self.generated > 0

    def fetches(self) -> list[Future]:
        return [f for f in (self.adapter_ready, self.prompt_rows) if f is not None]


@dataclass
class StepPlan:
    """One step: the running sequences (in arrival order) and the tokens each feeds (absent: none this step)."""
    running: list[ScheduledSequence]
    feeds: dict[ScheduledSequence, int]

    @property
    def sequences(self) -> list[ScheduledSequence]:
        """Those that feed tokens this step, in arrival order."""
        return [s for s in self.running if self.feeds.get(s)]

    def samples(self, sequence: ScheduledSequence) -> bool:
        """Whether this step feeds the sequence's last pending token, so its next token is sampled."""
        return self.feeds.get(sequence, 0) == len(sequence.pending)


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


class GenerationScheduler:
    """Thread-safe: requests are enqueued from RPC threads, steps are planned and completed by one loop."""

    def __init__(self, *, kv_budget_bytes: int, max_waiting: int = 256, max_running: int = 64,
                 max_step_tokens: int = 128,
                 on_admit: Callable[[ScheduledSequence], None] = lambda sequence: None) -> None:
        self.kv_budget_bytes = kv_budget_bytes
        self.max_waiting = max_waiting
        self.max_running = max_running
        self.max_step_tokens = max(1, max_step_tokens)
        self.on_admit = on_admit          # runs as a sequence is admitted: the step runner allocates its cache
        self.stats = EngineStats(kv_budget_bytes=kv_budget_bytes)
        self._waiting: FairQueue[ScheduledSequence] = FairQueue()
        self._running: list[ScheduledSequence] = []
        self._kv_used = 0
        self._cond = threading.Condition()
        self._stop = False

    # ---- requests ----------------------------------------------------------------------------

    def check_room(self) -> None:
        """Raises when a new request would be refused (checked before fetching anything for it, and again)."""
        with self._cond:
            if self._stop:
                raise FailedPrecondition("the generation engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise ResourceExhausted(f"{len(self._waiting)} generation requests are already waiting for KV "
                                        f"cache; back off and retry")

    def enqueue(self, sequence: ScheduledSequence) -> None:
        with self._cond:
            self.check_room()
            request = sequence.request
            self._waiting.push(request.tenant_id, sequence, cost=len(request.prompt) + request.params.max_new_tokens,
                               weight=request.weight)
            self._cond.notify()

    # ---- steps -------------------------------------------------------------------------------

    def next_step(self, wait: bool = True) -> StepPlan | None:
        """Waits for work (unless `wait` is False), drops cancelled sequences, admits what fits and plans the
        step; None once stopped (every sequence left then fails). A plan may run nothing: only waiting
        requests, for room or for their fetches."""
        with self._cond:
            while wait and not self._stop and not self._running and not self._waiting:
                self._cond.wait()
            if self._stop:
                for sequence in list(self._running) + list(self._waiting):
                    sequence.stream.put(StreamEvent(error=FailedPrecondition("compute is shutting down")))
                return None
            self._drop_cancelled()
            self._admit()
            running = list(self._running)
            return StepPlan(running, self._feeds(running))

    def complete_step(self, plan: StepPlan, sampled: dict[ScheduledSequence, int],
                      details: dict[ScheduledSequence, Any] | None = None) -> None:
        """The step ran: its fed tokens leave `pending`; a sequence that fed its last one gets its sampled
        token (`sampled`), streamed with what `details` holds for it, and finishes at a stop token or at
        max_new_tokens."""
        with self._cond:
            fed = {s: n for s, n in plan.feeds.items() if n}
            self.stats.steps += 1
            self.stats.prompt_tokens += sum(n for s, n in fed.items() if not s.decoding)
            self.stats.largest_step = max(self.stats.largest_step, sum(fed.values()))
            for sequence, count in fed.items():
                sequence.pending = sequence.pending[count:]
                if sequence.pending:
                    continue        # the rest of its prompt comes in the next steps: nothing sampled yet
                token = sampled[sequence]
                sequence.generated += 1
                sequence.tokens.append(token)
                sequence.pending = [token]
                self.stats.tokens_generated += 1
                sequence.stream.put(StreamEvent(token_id=token, details=(details or {}).get(sequence)))
                params = sequence.request.params
                reason = ("stop" if token in params.stop_token_ids
                          else "length" if sequence.generated >= params.max_new_tokens else None)
                if reason is not None:
                    sequence.stream.put(StreamEvent(finish_reason=reason))
                    self._finish(sequence)

    def fail(self, sequences: list[ScheduledSequence], error: BaseException) -> None:
        """A step failed: its sequences get the error and leave."""
        with self._cond:
            for sequence in sequences:
                sequence.stream.put(StreamEvent(error=error))
                self._finish(sequence)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def snapshot(self) -> EngineStats:
        with self._cond:
            self.stats.running, self.stats.waiting = len(self._running), len(self._waiting)
            self.stats.kv_bytes_used = self._kv_used
            return EngineStats(**vars(self.stats))

    # ---- policy (under the lock) -------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._running if s.stream.cancelled]:
            sequence.stream.put(StreamEvent(finish_reason="cancelled"))
            self._finish(sequence)
        for sequence in self._waiting.remove_where(lambda s: s.stream.cancelled):
            sequence.stream.put(StreamEvent(finish_reason="cancelled"))

    def _admit(self) -> None:
        """In fair order: the head of the queue waits for room (and for its adapter and prompt rows, fetched
        since submit) rather than being overtaken. A request whose fetch failed fails alone."""
        while self._waiting and len(self._running) < self.max_running:
            sequence = self._waiting.peek()
            fetches = sequence.fetches()
            if not all(f.done() for f in fetches):
                return
            failed = next((f.exception() for f in fetches if f.exception() is not None), None)
            if failed is not None:
                self._waiting.pop()
                sequence.stream.put(StreamEvent(error=failed))
                continue
            if self._kv_used + sequence.kv_bytes > self.kv_budget_bytes:
                return
            self._waiting.pop()
            self.on_admit(sequence)
            self._kv_used += sequence.kv_bytes
            self._running.append(sequence)

    def _finish(self, sequence: ScheduledSequence) -> None:
        if sequence in self._running:
            self._running.remove(sequence)
            self._kv_used -= sequence.kv_bytes
            sequence.state = None     # the KV cache goes with it

    def _feeds(self, running: list[ScheduledSequence]) -> dict[ScheduledSequence, int]:
        """Tokens each sequence feeds this step: a decoding sequence its one token; prompts, in arrival order,
        what is left of the step's token budget (the first prompt always gets at least one chunk)."""
        feeds = {s: len(s.pending) for s in running if s.decoding}
        budget = self.max_step_tokens - sum(feeds.values())
        for sequence in running:
            if not sequence.decoding:
                take = min(len(sequence.pending), max(budget, 0))
                if take == 0 and not any(feeds.get(s) for s in running if not s.decoding):
                    take = min(len(sequence.pending), PREFILL_CHUNK_MIN)   # progress even under many decodes
                if take:
                    feeds[sequence] = take
                    budget -= take
        return feeds
