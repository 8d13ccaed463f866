"""Scheduling for continuous batching of generative tenants: which requests run, which wait, and how many
tokens each running sequence feeds the next step. Plain Python, no tensors: a policy can be read and
tested apart from the model (the step runner, generation_steps.py, does the tensor work).

- Queue: fair across tenants (services/common/fair_queue.py: start-time fair queuing by tokens, prompt +
  max new tokens, weighted by the tenant's priority), first come first served within a tenant, so one tenant's
  burst cannot hold the others back by its length; past `max_waiting` a submit is refused (RESOURCE_EXHAUSTED).
- Paged KV (kv_blocks.py): the head of the queue (in that fair order) is admitted once its fetches (adapter,
  prompt rows) are done and the blocks of its prompt fit, less those the prefix cache already holds, with one
  block to spare per running sequence; it is never overtaken. A request whose fetch failed fails alone. A
  decoding sequence takes a new block as it crosses a block boundary; when the pool has none left, the
  youngest running sequence is preempted: its blocks go back (its full ones stay in the prefix cache) and it
  waits, ahead of every new request, to recompute its tokens, so the oldest sequences always progress.
- Prefix caching: full blocks are registered under keys that chain the tokens to the tenant, adapter version,
  domain revision and split layer, so a repeated system prompt or chat history of the same tenant skips its
  prefill, and a preempted sequence gets back what was not evicted meanwhile.
- Chunked prefill: a step feeds at most `max_step_tokens`: every decoding sequence's one token first, then
  prompts in arrival order share the rest (the first prompt always gets a chunk), so a long prompt delays
  the others' next token by a bounded step.
- KV budget (H2O): a decoding sequence with `kv_budget` keeps that many tokens' keys and values per layer once
  it holds a block more, each key/value head its own: a quarter of the budget its most recent tokens, the
  rest the earlier tokens that received the most attention per query that saw them (generation_steps.py).
  The scheduler gives it fresh blocks for the
  kept tokens (`Compaction`), the step runner chooses and copies them, and the old blocks go back after the
  step; its positions keep counting every token, and its blocks are never registered for prefix reuse.
- Cancellation: a cancelled stream leaves between steps and frees its blocks.
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
from services.compute.kv_blocks import BLOCK_TOKENS, Block, BlockManager, Copies, PrefixKeys

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
    kv_budget: int = 0                # KV tokens kept per layer once decoding (heavy hitters + recent); 0 = all
    forced_tokens: tuple[int, ...] = ()   # emitted instead of sampled, in order (scores a given continuation)
    presence_penalty: float = 0.0     # OpenAI's: minus this for every token generated so far; 0 = off
    frequency_penalty: float = 0.0    # OpenAI's: minus this times each token's count so far; 0 = off
    repetition_penalty: float = 1.0   # CTRL's (transformers, vLLM): prompt and generated tokens; 1 = off
    output_pattern: str = ""          # structured output: the text must match this regex (constrained_output.py)

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class GenerationRequest:
    tenant_id: str
    adapter_version: int
    domain: str
    split_layer: int
    prompt: np.ndarray                # int token ids
    params: SamplingParams
    weight: float = 1.0               # the tenant's share of the queue (its priority)
    domain_revision: int = 0          # the domain's build its PLOT rows come from (part of the prefix key)
    output_index: Any = None          # output_pattern compiled (the engine sets it at submit)
    output_eos: int = -1              # the end-of-text token it was compiled with


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
    layers: int                                            # units per KV block: the layers it runs
    prefix: PrefixKeys
    tokens: list[int] = field(default_factory=list)        # prompt + generated
    pending: list[int] = field(default_factory=list)       # not fed yet: the prompt's rest, or the last token
    generated: int = 0
    evicted: int = 0                                       # tokens dropped from its KV by its KV budget
    preemptions: int = 0                                   # times it was preempted (and recomputed)
    blocks: list[Block] = field(default_factory=list)      # its KV, in token order (empty while waiting)
    registered: int = 0                                    # of them, kept in the prefix cache
    admitted: int = -1                                     # order of first admission (preemption: youngest first)
    adapter_ready: Future | None = None                    # the adapter in compute's host cache
    prompt_rows: Future | None = None                      # PLOT rows of the prompt, fetched ahead
    state: object | None = None                            # the step runner's (sampler, rows) once admitted

    @classmethod
    def of(cls, request: GenerationRequest, layers: int, namespace: str = "",
           block_tokens: int = BLOCK_TOKENS) -> ScheduledSequence:
        """`namespace` names the model whose KV this is (the root of its prefix keys, with the tenant,
        adapter version, domain, domain revision and split layer)."""
        prompt = [int(t) for t in request.prompt]
        root = (namespace, request.tenant_id, request.adapter_version, request.domain, request.domain_revision,
                request.split_layer)
        return cls(request, TokenStream(), layers, PrefixKeys(root, block_tokens), tokens=prompt,
                   pending=list(prompt))

    @property
    def decoding(self) -> bool:
        """Past its prompt (and any recomputation after a preemption): it feeds one generated token per step."""
        return self.generated > 0 and len(self.pending) == 1

    @property
    def computed(self) -> int:
        """Tokens fed so far (the position of its next fed token)."""
        return len(self.tokens) - len(self.pending)

    @property
    def held(self) -> int:
        """Tokens whose keys and values are in its KV blocks (fewer than `computed` under a KV budget)."""
        return self.computed - self.evicted

    def fetches(self) -> list[Future]:
        return [f for f in (self.adapter_ready, self.prompt_rows) if f is not None]


@dataclass
class Compaction:
    """A sequence's KV cut to its budget at the start of a step: `keep` of its `held` tokens go to `blocks`."""
    blocks: list[Block]
    keep: int
    held: int


@dataclass
class StepPlan:
    """One step: the running sequences (in arrival order) and the tokens each feeds (absent: none this step)."""
    running: list[ScheduledSequence]
    feeds: dict[ScheduledSequence, int]
    compactions: dict[ScheduledSequence, Compaction] = field(default_factory=dict)
    copies: Copies = field(default_factory=lambda: Copies([], []))   # host tier: made before the step runs

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
    waiting: int = 0                # new requests and preempted sequences
    kv_bytes_used: int = 0          # blocks held by running sequences
    kv_bytes_cached: int = 0        # prefix-cache blocks nobody holds (given up first when room is needed)
    kv_budget_bytes: int = 0
    block_tokens: int = 0
    prefix_queries: int = 0         # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0            # of them whose prefill was skipped
    preemptions: int = 0
    evictions: int = 0
    kv_host_budget_bytes: int = 0   # the host tier (0: none)
    kv_host_bytes_cached: int = 0   # blocks it keeps for a later prefix hit
    swapped_out: int = 0            # blocks the pool gave up into the host tier
    swapped_in: int = 0             # blocks copied back for a prefix hit


class GenerationScheduler:
    """Thread-safe: requests are enqueued from RPC threads, steps are planned and completed by one loop."""

    def __init__(self, blocks: BlockManager, *, unit_bytes: int = 0, max_waiting: int = 256, max_running: int = 64,
                 max_step_tokens: int = 128, prefix_caching: bool = True,
                 on_admit: Callable[[ScheduledSequence], None] = lambda sequence: None) -> None:
        self.blocks = blocks
        self.unit_bytes = unit_bytes      # bytes of one pool unit (for the statistics)
        self.max_waiting = max_waiting
        self.max_running = max_running
        self.max_step_tokens = max(1, max_step_tokens)
        self.prefix_caching = prefix_caching
        self.on_admit = on_admit          # runs as a sequence is first admitted: the step runner's sampler
        self.stats = EngineStats(kv_budget_bytes=blocks.stats.units * unit_bytes, block_tokens=blocks.block_tokens)
        self._waiting: FairQueue[ScheduledSequence] = FairQueue()
        self._preempted: list[ScheduledSequence] = []      # by first admission: they resume before new requests
        self._running: list[ScheduledSequence] = []        # by first admission
        self._admissions = 0
        self._pending_compactions: dict[ScheduledSequence, Compaction] = {}   # planned, not yet completed
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

    def fits_pool(self, tokens: int, layers: int) -> bool:
        """Whether a sequence of `tokens` tokens over `layers` layers fits the whole pool (else it never could)."""
        return self.blocks.blocks_for(tokens) * layers <= self.blocks.stats.units

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
            while wait and not self._stop and not self._running and not self._waiting and not self._preempted:
                self._cond.wait()
            if self._stop:
                for sequence in list(self._running) + self._preempted + list(self._waiting):
                    sequence.stream.put(StreamEvent(error=FailedPrecondition("compute is shutting down")))
                return None
            self._drop_cancelled()
            self._admit()
            compactions = self._compact()
            self._grow()
            running = list(self._running)
            return StepPlan(running, self._feeds(running), {s: c for s, c in compactions.items() if s in running},
                            self.blocks.take_copies())

    def complete_step(self, plan: StepPlan, sampled: dict[ScheduledSequence, int],
                      details: dict[ScheduledSequence, Any] | None = None) -> None:
        """The step ran: its fed tokens leave `pending`; a sequence that fed its last one gets its sampled
        token (`sampled`), streamed with what `details` holds for it, and finishes at a stop token or at
        max_new_tokens."""
        with self._cond:
            for sequence, compaction in plan.compactions.items():
                self._pending_compactions.pop(sequence, None)
                old, sequence.blocks = sequence.blocks, compaction.blocks
                for block in old:
                    self.blocks.release(block)
                sequence.evicted += compaction.held - compaction.keep
            fed = {s: n for s, n in plan.feeds.items() if n}
            self.stats.steps += 1
            self.stats.prompt_tokens += sum(n for s, n in fed.items() if not s.decoding)
            self.stats.largest_step = max(self.stats.largest_step, sum(fed.values()))
            for sequence, count in fed.items():
                sequence.pending = sequence.pending[count:]
                self._register_full_blocks(sequence)
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
                for block in self._pending_compactions.pop(sequence, Compaction([], 0, 0)).blocks:
                    self.blocks.release(block)
                sequence.stream.put(StreamEvent(error=error))
                self._finish(sequence)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def has_work(self) -> bool:
        """Sequences running, waiting or preempted: what co-served training yields to (coserving.py)."""
        return bool(self._running or self._waiting or self._preempted)

    def snapshot(self) -> EngineStats:
        with self._cond:
            self.stats.running, self.stats.waiting = len(self._running), len(self._waiting) + len(self._preempted)
            blocks = self.blocks.stats
            self.stats.kv_bytes_used = blocks.units_used * self.unit_bytes
            self.stats.kv_bytes_cached = blocks.units_cached * self.unit_bytes
            self.stats.prefix_queries, self.stats.prefix_hits = blocks.prefix_queries, blocks.prefix_hits
            self.stats.evictions = blocks.evictions
            self.stats.kv_host_budget_bytes = blocks.host_units * self.unit_bytes
            self.stats.kv_host_bytes_cached = blocks.host_units_cached * self.unit_bytes
            self.stats.swapped_out, self.stats.swapped_in = blocks.swapped_out, blocks.swapped_in
            return EngineStats(**vars(self.stats))

    # ---- policy (under the lock) -------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._running + self._preempted if s.stream.cancelled]:
            sequence.stream.put(StreamEvent(finish_reason="cancelled"))
            self._finish(sequence)
        for sequence in self._waiting.remove_where(lambda s: s.stream.cancelled):
            sequence.stream.put(StreamEvent(finish_reason="cancelled"))

    def _admit(self) -> None:
        """Preempted sequences first (oldest first), then the queue in fair order: the head waits for room
        (and for its adapter and prompt rows, fetched since submit) rather than being overtaken."""
        while self._preempted and len(self._running) < self.max_running:
            if not self._take_blocks(self._preempted[0]):
                return
            self._run(self._preempted.pop(0))
        while self._waiting and len(self._running) < self.max_running and not self._preempted:
            sequence = self._waiting.peek()
            fetches = sequence.fetches()
            if not all(f.done() for f in fetches):
                return
            failed = next((f.exception() for f in fetches if f.exception() is not None), None)
            if failed is not None:
                self._waiting.pop()
                sequence.stream.put(StreamEvent(error=failed))
                continue
            if not self._take_blocks(sequence):
                return
            self._waiting.pop()
            sequence.admitted = self._admissions
            self._admissions += 1
            self.on_admit(sequence)
            self._run(sequence)

    def _take_blocks(self, sequence: ScheduledSequence) -> bool:
        """Gives the sequence the blocks of all its tokens: cached ones for the longest known prefix (never its
        last token, whose logits the step needs), new ones for the rest, if they fit with one block to spare
        per running sequence. Its pending tokens start after the cached prefix."""
        manager, tokens = self.blocks, sequence.tokens
        params = sequence.request.params
        # Prompt log-probabilities need every prompt position computed; a KV budget needs the attention every
        # prompt token received from the prompt's queries (the heavy hitters), which a cached block never saw.
        reuse = (self.prefix_caching and not (params.prompt_logprobs and sequence.generated == 0)
                 and not params.kv_budget)
        hits = (manager.match(sequence.prefix.extend(tokens, (len(tokens) - 1) // manager.block_tokens),
                              sequence.layers) if reuse else [])
        needed = (manager.blocks_for(len(tokens)) - len(hits)) * sequence.layers
        spare = sum(s.layers for s in self._running)
        if needed + spare > manager.available():
            for block in hits:
                manager.release(block)
            return False
        sequence.blocks = hits + [manager.allocate(sequence.layers) for _ in range(needed // sequence.layers)]
        sequence.registered = len(hits)
        sequence.pending = tokens[len(hits) * manager.block_tokens:]
        manager.stats.prefix_queries += len(tokens) if reuse else 0
        manager.stats.prefix_hits += len(hits) * manager.block_tokens
        return True

    def _run(self, sequence: ScheduledSequence) -> None:
        self._running.append(sequence)
        self._running.sort(key=lambda s: s.admitted)

    def _compact(self) -> dict[ScheduledSequence, Compaction]:
        """Fresh blocks for the kept tokens of every decoding sequence that holds a block more than its KV
        budget (skipped, for this step, when the pool has none to spare)."""
        self._pending_compactions.clear()
        size = self.blocks.block_tokens
        for sequence in self._running:
            budget = sequence.request.params.kv_budget
            if not budget or not sequence.decoding or sequence.held < budget + size:
                continue
            blocks = [self.blocks.allocate(sequence.layers) for _ in range(self.blocks.blocks_for(budget + 1))]
            if None in blocks:
                for block in blocks:
                    if block is not None:
                        self.blocks.release(block)
                continue
            self._pending_compactions[sequence] = Compaction(blocks, budget, sequence.held)
        return dict(self._pending_compactions)

    def _grow(self) -> None:
        """A block for every sequence whose next token crosses into one; the youngest running sequence is
        preempted while the pool has none (possibly the one growing, if it is the youngest)."""
        size = self.blocks.block_tokens
        for sequence in list(self._running):
            if sequence in self._pending_compactions:
                continue            # its new blocks hold its kept tokens and the next one
            while sequence in self._running and len(sequence.blocks) * size < sequence.held + len(sequence.pending):
                block = self.blocks.allocate(sequence.layers)
                if block is not None:
                    sequence.blocks.append(block)
                else:
                    self._preempt(self._running[-1])

    def _preempt(self, sequence: ScheduledSequence) -> None:
        """Its blocks go back (the full ones stay cached) and it waits to recompute its tokens."""
        self._running.remove(sequence)
        self._release_blocks(sequence)
        sequence.pending, sequence.evicted = list(sequence.tokens), 0
        sequence.preemptions += 1
        self.stats.preemptions += 1
        self._preempted.append(sequence)
        self._preempted.sort(key=lambda s: s.admitted)

    def _register_full_blocks(self, sequence: ScheduledSequence) -> None:
        if sequence.evicted:
            return                  # its blocks no longer hold a plain prefix
        full = sequence.computed // self.blocks.block_tokens
        if full > sequence.registered:
            keys = sequence.prefix.extend(sequence.tokens, full)
            for i in range(sequence.registered, full):
                self.blocks.register(sequence.blocks[i], keys[i])
            sequence.registered = full

    def _release_blocks(self, sequence: ScheduledSequence) -> None:
        for block in sequence.blocks + self._pending_compactions.pop(sequence, Compaction([], 0, 0)).blocks:
            self.blocks.release(block)
        sequence.blocks, sequence.registered = [], 0

    def _finish(self, sequence: ScheduledSequence) -> None:
        for group in (self._running, self._preempted):
            if sequence in group:
                group.remove(sequence)
                self._release_blocks(sequence)
                sequence.state = None     # its sampler and rows go with it

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
