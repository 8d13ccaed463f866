"""Classify, Embed and Generate for tenants of every model the gateway serves, and what the doors derive from
them (chat prompts, tokens).

Every operation first asks `access` who the caller is and checks the tenant against its scope (access.py), then
the tenant's quotas (quotas.py), before any work is queued."""
from __future__ import annotations

import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from services.compute.client import GenerationParams, ReplicaUnreachable, Sequence, generate
from services.gateway import metrics
from services.gateway.access import Access, Principal
from services.gateway.batcher import SequenceFailed, SequenceResult, SequenceWork
from services.gateway.core.call import Call
from services.gateway.core.chat import ChatTemplates
from services.gateway.core.lanes import DecoderLane, EncoderLane, Lane
from services.gateway.directory import TenantDirectory, TenantRoute
from services.gateway.generation import GenerationPlan, TextStreamer, generation_affinity, plan_generation
from services.gateway.quotas import Limits, Permit, Quotas
from services.gateway.router import Replica, Router
from services.gateway.structured_output import OutputFormat


@dataclass(frozen=True)
class TextsRequest:
    """Classify or Embed: one tenant, a few texts."""
    tenant_id: str
    texts: tuple[str, ...]
    truncate: bool = False


@dataclass(frozen=True)
class Classification:
    label: str
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]      # per label, softmax of the logits
    logits: tuple[float, ...]


@dataclass(frozen=True)
class Classified:
    results: list[Classification]
    prompt_tokens: int
    version: int = 0                      # the tenant's adapter version that answered


@dataclass(frozen=True)
class Embedded:
    embeddings: list[np.ndarray]          # float32 [hidden] per text
    prompt_tokens: int
    version: int = 0


@dataclass(frozen=True)
class GenerateRequest:
    tenant_id: str
    prompt: str
    max_new_tokens: int = 0               # 0: the gateway's default
    temperature: float = 1.0              # 0: greedy
    top_k: int = 0                        # 0: off
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None               # None: a random one
    prompt_ids: tuple[int, ...] | None = None   # token ids of the model's tokenizer instead of `prompt`
    ignore_eos: bool = False              # generate max_new_tokens, past end-of-text tokens
    truncate_prompt_tokens: int = 0       # > 0: keep only the prompt's last so many tokens
    logprobs: int | None = None           # each generated token's log-probability and so many alternatives
    prompt_logprobs: bool = False         # the prompt's tokens' too (on the first piece)
    presence_penalty: float = 0.0         # [-2, 2], 0: off (OpenAI's)
    frequency_penalty: float = 0.0        # [-2, 2], 0: off (OpenAI's)
    repetition_penalty: float = 1.0       # (0, 2], 1: off (CTRL's, as transformers and vLLM)
    output_format: OutputFormat | None = None   # structured output (JSON object, JSON schema, regex, choice)
    session_id: str = ""                  # the conversation it continues: its turns go to one compute replica
    kv_budget: int = 0                    # > 0: KV tokens kept per layer and head once decoding (H2O)


@dataclass(frozen=True)
class TokenChoice:
    id: int
    text: str                             # the token alone, decoded (special tokens included)
    logprob: float | None                 # None: the prompt's first token (nothing predicts it)


@dataclass(frozen=True)
class TokenLogprobs:
    token: TokenChoice
    top: list[TokenChoice]                # the likeliest tokens at its position, likeliest first


@dataclass(frozen=True)
class GeneratedText:
    """One piece of a generation stream: new text, the tokens it came from, why it ended (last piece only), and
    the prompt's length (first piece only)."""
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    prompt_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None          # per token_ids, when asked for
    prompt_logprobs: list[TokenLogprobs] | None = None   # every prompt token (first piece), when asked for


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    special: bool
    start: int                            # characters of the text it covers (0, 0 for an added special token)
    stop: int


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def answer_margin(timeout: float) -> float:
    """How long before the caller's deadline the gateway gives up waiting, so that its own answer (which says
    why: no replica reachable) arrives before the caller's deadline does."""
    return min(0.1, 0.05 * timeout)


def no_replica(lane_name: str, router: Router, waited: float) -> Unavailable:
    return Unavailable(f"no compute replica of model {lane_name!r} is reachable ({router.describe()}); waited "
                       f"{waited:.1f}s within the request's deadline: retry with backoff")


def open_access() -> Access:
    """`--auth off`: every caller is the admin."""
    return Access(enabled=False, admin_token=None, keys=None)


class Inference:
    def __init__(self, lanes: dict[str, Lane], directory: TenantDirectory, default_timeout: float = 30.0,
                 access: Access | None = None, quotas: Quotas | None = None,
                 chat: ChatTemplates | None = None) -> None:
        self.lanes = lanes
        self.default_model = next(iter(lanes))
        self.directory = directory
        self.default_timeout = default_timeout      # for calls without a deadline (Generate: its lane's own)
        self.access = access or open_access()
        self.quotas = quotas or Quotas()
        self.chat = chat

    # ---- who and which tenant ------------------------------------------------------------------

    def principal(self, call: Call) -> Principal:
        if call.principal is None:
            call.principal = self.access.principal_of(call.credential)
        return call.principal

    def admit(self, call: Call, route: TenantRoute) -> Permit:
        """The tenant's quotas and its caller's key's, before any work."""
        principal = self.principal(call)
        rps, tps, concurrent = principal.key_limits
        return self.quotas.admit(route.tenant_id, route.limits, principal.key_id,
                                 Limits(rps=rps, tps=tps, max_concurrent=concurrent))

    def route(self, call: Call, tenant_id: str, what: str) -> TenantRoute:
        """The tenant's route, for a caller allowed to use it."""
        principal = self.principal(call)          # who, before anything else
        if not tenant_id:
            raise InvalidArgument("tenant_id is required")
        principal.require_tenant(tenant_id, what)
        return self.directory.resolve(tenant_id, call.timeout(self.default_timeout))

    def lane_of(self, route: TenantRoute) -> Lane:
        lane = self.lanes.get(route.model or self.default_model)
        if lane is None:
            raise FailedPrecondition(f"tenant {route.tenant_id!r} belongs to base model {route.model!r}, which this "
                                     f"gateway does not serve (models: {', '.join(self.lanes)}); start it with "
                                     f"--model {route.model}=DIR and --compute {route.model}=ADDRESS")
        return lane

    def task(self, model: str, labels) -> str:
        """What a tenant of `model` with `labels` does: generate, classify or embed."""
        if isinstance(self.lanes.get(model or self.default_model), DecoderLane):
            return "generate"
        return "classify" if labels else "embed"

    # ---- classify and embed --------------------------------------------------------------------

    def classify(self, call: Call, request: TextsRequest) -> Classified:
        with metrics.observed("Classify", request.tenant_id, self._no_model) as observed:
            results, route, tokens = self._run(call, request, False, observed)
            labels = route.labels
            classes = []
            for result in results:
                logits = result.logits.astype(np.float64)
                probabilities = softmax(logits)
                classes.append(Classification(labels[int(np.argmax(probabilities))], tuple(labels),
                                              tuple(probabilities.tolist()), tuple(logits.tolist())))
            return Classified(classes, tokens, route.adapter_version)

    def embed(self, call: Call, request: TextsRequest) -> Embedded:
        with metrics.observed("Embed", request.tenant_id, self._no_model) as observed:
            results, route, tokens = self._run(call, request, True, observed)
            return Embedded([np.asarray(r.embedding, dtype=np.float32) for r in results], tokens,
                            route.adapter_version)

    @staticmethod
    def _no_model() -> str:
        return ""

    def _run(self, call: Call, request: TextsRequest, want_embedding: bool,
             observed: dict) -> tuple[list[SequenceResult], TenantRoute, int]:
        """Results per text, the tenant's route they ran with and the tokens the texts came to.

        Resolves the tenant, queues its sequences and waits for them. Labels and adapter always come from one
        resolved version: when compute finds that version gone (the tenant was replaced or deleted, or its domain
        rebuilt, since this gateway resolved it), the tenant is resolved again and the request runs once more."""
        timeout = call.timeout(self.default_timeout)
        started = time.monotonic()
        route = self.route(call, request.tenant_id, "Embed" if want_embedding else "Classify")
        permit = self.admit(call, route)     # before any work
        try:
            return self._run_admitted(call, request, want_embedding, started, timeout, route, permit, observed)
        finally:
            permit.release()

    def _encoder_lane(self, route: TenantRoute, want_embedding: bool) -> EncoderLane:
        lane = self.lane_of(route)
        if isinstance(lane, DecoderLane):
            raise FailedPrecondition(f"tenant {route.tenant_id!r} generates text (its base model is a decoder): call "
                                     f"Generate")
        if not route.labels and not want_embedding:
            raise FailedPrecondition(f"tenant {route.tenant_id!r} is embedding-only (registered without labels, its "
                                     f"adapter has no classification head): call Embed, or register it again with "
                                     f"--labels and a head to classify")
        return lane

    def _run_admitted(self, call: Call, request: TextsRequest, want_embedding: bool, started: float,
                      timeout: float, route: TenantRoute, permit: Permit,
                      observed: dict) -> tuple[list[SequenceResult], TenantRoute, int]:
        deadline = started + timeout
        work: list[SequenceWork] = []
        call.cancellation.add_callback(lambda: [item.abandon() for item in work])   # the caller went away
        encoded: tuple[str, list] | None = None
        for attempt in range(2):
            if attempt:
                route = self.directory.resolve(request.tenant_id, max(0.05, deadline - time.monotonic()))
            lane = self._encoder_lane(route, want_embedding)
            observed["model"] = lane.name
            if encoded is None or encoded[0] != lane.name:
                encoded = (lane.name, lane.encoder.encode(list(request.texts), request.truncate))
                metrics.TOKENS.labels(lane.name, "in").inc(sum(len(ids) for ids in encoded[1]))
                if not attempt:
                    permit.charge(sum(len(ids) for ids in encoded[1]))     # tokens/s, before anything is queued
            work[:] = [SequenceWork(ids, route, deadline, want_embedding) for ids in encoded[1]]
            lane.batcher.submit(work)
            try:
                results = self._wait(work, lane, deadline, timeout, started)
                return results, route, sum(len(ids) for ids in encoded[1])
            except SequenceFailed as failure:
                for item in work:
                    item.abandon()
                if not failure.stale or attempt:
                    raise
                self.directory.invalidate(tenant_id=request.tenant_id, domain=route.domain)
        raise AssertionError("unreachable")

    def _wait(self, work: list[SequenceWork], lane: EncoderLane, deadline: float, timeout: float,
              started: float) -> list[SequenceResult]:
        """Every sequence's result; UNAVAILABLE (just before the deadline) when no replica was reachable the whole
        time, DEADLINE_EXCEEDED when replicas were there but too slow."""
        give_up = deadline - answer_margin(timeout)
        try:
            return [item.future.result(timeout=max(0.0, give_up - time.monotonic())) for item in work]
        except FutureTimeout:
            if not lane.router.usable_count():
                for item in work:
                    item.abandon()
                raise no_replica(lane.name, lane.router, time.monotonic() - started) from None
        try:
            return [item.future.result(timeout=max(0.0, deadline - time.monotonic())) for item in work]
        except FutureTimeout:
            for item in work:
                item.abandon()
            raise DeadlineExceeded(f"no result within the deadline of {timeout:.2f}s; the service is overloaded "
                                   f"or the deadline too short") from None

    # ---- generate ------------------------------------------------------------------------------

    def generate(self, call: Call, request: GenerateRequest) -> Iterator[GeneratedText]:
        """The stream of a generative tenant's text; stops generating on compute when `call` is cancelled."""
        with metrics.observed("Generate", request.tenant_id, self._no_model) as observed:
            arrived = time.monotonic()
            route = self.route(call, request.tenant_id, "Generate")
            permit = self.admit(call, route)     # before any work
            call.cancellation.add_callback(permit.release)
            try:
                yield from self._generate_admitted(call, request, observed, arrived, route, permit)
            finally:
                permit.release()

    def decoder_lane(self, route: TenantRoute) -> DecoderLane:
        if route.labels:
            raise FailedPrecondition(f"tenant {route.tenant_id!r} is a classifier: call Classify or Embed")
        lane = self.lane_of(route)
        if not isinstance(lane, DecoderLane):
            raise FailedPrecondition(f"base model {route.model!r} is an encoder: it classifies and embeds, it does "
                                     f"not generate")
        return lane

    def _generate_admitted(self, call: Call, request: GenerateRequest, observed: dict, arrived: float,
                           route: TenantRoute, permit: Permit) -> Iterator[GeneratedText]:
        lane = self.decoder_lane(route)
        observed["model"] = lane.name
        timeout = call.timeout(lane.timeout)
        deadline = arrived + timeout
        plan = plan_generation(lane.tokenizer, request, lane.limits, max_positions=lane.max_positions,
                               eos_token_ids=lane.eos_token_ids)
        permit.charge(len(plan.prompt_ids) + plan.max_new_tokens)      # tokens/s: what it may cost at most
        metrics.TOKENS.labels(lane.name, "in").inc(len(plan.prompt_ids))
        generated = [0]
        try:
            yield from self._stream(call, arrived, route, lane, plan, timeout, deadline, generated)
        finally:
            permit.give_back(plan.max_new_tokens - generated[0])       # a stream that stopped early costs less

    def _stream(self, call: Call, arrived: float, route: TenantRoute, lane: DecoderLane, plan: GenerationPlan,
                timeout: float, deadline: float, generated: list[int]) -> Iterator[GeneratedText]:
        streamer = TextStreamer(lane.tokenizer, plan.stop)
        first = True
        last_token_at = None
        tried: set[str] = set()
        sequence = Sequence(route.tenant_id, route.adapter_version, route.domain, route.split_layer, route.model,
                            route.domain_revision, plan.prompt_ids)
        params = GenerationParams(plan.max_new_tokens, plan.temperature, plan.top_k, plan.top_p, plan.seed,
                                  tuple(plan.stop_token_ids), logprobs=plan.logprobs is not None,
                                  top_logprobs=plan.logprobs or 0, prompt_logprobs=plan.prompt_logprobs,
                                  presence_penalty=plan.presence_penalty, frequency_penalty=plan.frequency_penalty,
                                  repetition_penalty=plan.repetition_penalty, output_pattern=plan.output_pattern,
                                  kv_budget=plan.kv_budget)
        weight = self.quotas.effective(route.limits).weight
        while True:
            replica = self._generation_replica(lane, route, deadline, timeout, arrived, tried, plan.session_id)
            stream = generate(replica.stub, sequence, weight, params, max(0.05, deadline - time.monotonic()))
            call.cancellation.add_callback(stream.cancel)     # the client went away: compute frees the KV cache
            received = False
            try:
                for message in stream:
                    received = True
                    generated[0] += len(message.token_ids)
                    if message.token_ids:
                        now = time.monotonic()
                        if last_token_at is None:
                            metrics.TTFT_SECONDS.labels(lane.name).observe(now - arrived)
                        else:
                            metrics.INTER_TOKEN_SECONDS.labels(lane.name).observe(now - last_token_at)
                        last_token_at = now
                        metrics.TOKENS.labels(lane.name, "out").inc(len(message.token_ids))
                    ids = [t for t in message.token_ids if t not in plan.stop_token_ids]
                    piece = streamer.add(ids) if ids else ""
                    reason = "stop" if streamer.stopped else message.finish_reason
                    if reason:
                        piece += streamer.flush()
                    if piece or ids or reason or first:
                        yield GeneratedText(
                            piece, list(message.token_ids), reason, len(plan.prompt_ids) if first else 0,
                            self._logprobs(lane, message.logprobs, message.token_ids) if message.logprobs else None,
                            self._prompt_logprobs(lane, plan.prompt_ids, message.prompt_logprobs)
                            if first and plan.prompt_logprobs else None)
                        first = False
                    if reason:
                        stream.cancel()
                        return
                return
            except ReplicaUnreachable:
                # Before compute answered anything the request may go to another replica (nothing was generated).
                if received or time.monotonic() >= deadline - answer_margin(timeout):
                    raise
                lane.router.report_failure(replica)
                tried.add(replica.address)

    @staticmethod
    def _choice(lane: DecoderLane, token: int, logprob: float | None) -> TokenChoice:
        return TokenChoice(token, lane.tokenizer.decode([token], skip_special_tokens=False), logprob)

    def _logprobs(self, lane: DecoderLane, found, tokens) -> list[TokenLogprobs]:
        """Compute's log-probabilities of `tokens`, with each token's text."""
        return [TokenLogprobs(self._choice(lane, token, entry.logprob),
                              [self._choice(lane, alternative, lp) for alternative, lp in entry.top])
                for token, entry in zip(tokens, found)]

    def _prompt_logprobs(self, lane: DecoderLane, prompt_ids, found) -> list[TokenLogprobs]:
        """Every prompt token: the first without a log-probability, the others as the model predicted them."""
        ids = [int(t) for t in prompt_ids]
        rest = self._logprobs(lane, found or [], ids[1:])
        return [TokenLogprobs(self._choice(lane, ids[0], None), [])] + rest

    def _generation_replica(self, lane: DecoderLane, route: TenantRoute, deadline: float, timeout: float,
                            arrived: float, tried: set[str], session_id: str = "") -> Replica:
        """The home replica of the tenant, or of the tenant's conversation when the request names one (so its
        next turn finds the KV blocks of the last one there), else the next usable one, skipping those tried;
        waits for one within the deadline."""
        router = lane.router
        affinity = generation_affinity(route.tenant_id, session_id)
        while True:
            ranked = router.ranked(affinity)
            choice = next((r for r in ranked if r.address not in tried), ranked[0] if ranked else None)
            if choice is not None:
                router.claim(choice)
                return choice
            if not router.wait_usable(deadline - answer_margin(timeout)):
                raise no_replica(lane.name, router, time.monotonic() - arrived)

    # ---- what doors derive: chat prompts, tokens -----------------------------------------------

    def chat_prompt(self, call: Call, tenant_id: str, messages: list[dict]) -> str:
        """The prompt a generative tenant's base model makes of chat `messages` (its chat template)."""
        route = self.route(call, tenant_id, "Generate")
        lane = self.lane_of(route)
        if not isinstance(lane, DecoderLane):
            raise FailedPrecondition(f"tenant {tenant_id!r} classifies or embeds (its base model is an encoder): it "
                                     f"does not generate text")
        if self.chat is None:
            raise FailedPrecondition("this gateway renders no chat templates")
        return self.chat.render(lane.name, messages)

    def token_limit(self, call: Call, tenant_id: str) -> int:
        """How many tokens a sequence of the tenant may hold: its decoder's positions, or what the gateway cuts
        an encoder's texts to."""
        lane = self.lane_of(self.route(call, tenant_id, "Tokenize"))
        return lane.max_positions if isinstance(lane, DecoderLane) else lane.encoder.max_sequence_tokens

    def detokenize(self, call: Call, tenant_id: str, sequences: list[list[int]],
                   skip_special_tokens: bool = True) -> list[str]:
        """The text of each sequence of token ids of the tenant's base model (what tokenize gives back)."""
        route = self.route(call, tenant_id, "Tokenize")
        encoder = self.lane_of(route).encoder
        if not sequences:
            raise InvalidArgument("give at least one sequence of token ids")
        if len(sequences) > encoder.max_texts:
            raise InvalidArgument(f"{len(sequences)} sequences in one request exceed the limit of "
                                  f"{encoder.max_texts}; split the request")
        vocabulary = encoder.tokenizer.get_vocab_size()
        total = 0
        for index, ids in enumerate(sequences):
            total += len(ids)
            bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocabulary),
                       None)
            if bad is not None:
                raise InvalidArgument(f"sequence {index} holds {str(bad)[:40]}, not a token id of the base model "
                                      f"(0..{vocabulary - 1})")
        if total > encoder.max_request_chars:
            raise InvalidArgument(f"the request holds {total:,} token ids, above the limit of "
                                  f"{encoder.max_request_chars:,} per request; split the request")
        return encoder.tokenizer.decode_batch([list(ids) for ids in sequences],
                                              skip_special_tokens=skip_special_tokens)

    def tokenize(self, call: Call, tenant_id: str, texts: list[str],
                 add_special_tokens: bool = True) -> list[list[Token]]:
        """The tokens of each text as the tenant's base model reads them (no length limit but the request's)."""
        route = self.route(call, tenant_id, "Tokenize")
        lane = self.lane_of(route)
        tokens = []
        for text, encoding in zip(texts, lane.encoder.tokenize(texts, add_special_tokens)):
            specials = encoding.special_tokens_mask
            tokens.append([Token(int(token_id), text[start:stop] if stop > start else piece, bool(special),
                                 int(start), int(stop))
                           for token_id, piece, (start, stop), special
                           in zip(encoding.ids, encoding.tokens, encoding.offsets, specials)])
        return tokens
