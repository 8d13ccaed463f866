"""Continuous batching for generative tenants: one engine thread runs decoder steps over every running
sequence; new requests join and finished or cancelled ones leave between steps (token granularity).

The engine wires the scheduler (generation_scheduler.py: queue, paged KV admission and preemption, prefix
caching, chunked prefill, cancellation) to the step runner (generation_steps.py: tensors) over one KV pool
(`--kv-cache-mib`, in blocks of `BLOCK_TOKENS` tokens) and checks requests as they are submitted; a request's
adapter and prompt rows are fetched while earlier requests' steps run.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from models.decoder import DecoderModel
from models.kv_cache import HostKV, KVPool
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.compute.adapter_pool import AdapterPool
from services.compute.constrained_output import OutputConstraints
from services.compute.generation_scheduler import (
    EngineStats,
    GenerationRequest,
    GenerationScheduler,
    SamplingParams,
    ScheduledSequence,
    TokenStream,
)
from services.compute.generation_steps import PlotLookup, StepRunner
from services.compute.kv_blocks import BLOCK_TOKENS, BlockManager

log = logging.getLogger("hmi.compute.generation")


class GenerationEngine:
    def __init__(self, model: DecoderModel, pool: AdapterPool, plot: PlotLookup | None, *, kv_budget_bytes: int,
                 max_waiting: int = 256, max_running: int = 64, max_step_tokens: int = 128,
                 block_tokens: int = BLOCK_TOKENS, prefix_caching: bool = True, namespace: str = "",
                 kv_dtype: str = "float32", constraints: OutputConstraints | None = None,
                 kv_host_bytes: int = 0) -> None:
        """`namespace` names the served model in every prefix-cache key; `kv_dtype` is the pool's (KV_DTYPES);
        `constraints` compiles structured output's patterns (None: requests with one are refused);
        `kv_host_bytes` the host tier's size (0: none), where blocks the pool gives up wait for a prefix hit."""
        self.model = model
        self.pool = pool
        self.plot = plot
        self.namespace = namespace
        self.constraints = constraints
        self.block_tokens = block_tokens
        self.unit_bytes = unit_bytes = KVPool.unit_bytes(model.dims, block_tokens, kv_dtype)
        units = kv_budget_bytes // unit_bytes
        if units < 1:
            raise ValueError(f"a KV cache of {kv_budget_bytes} bytes holds no block of {block_tokens} tokens "
                             f"({unit_bytes} bytes a layer)")
        self.kv_budget_bytes = units * unit_bytes
        self.kv = KVPool(model.dims, units, block_tokens, model.device, kv_dtype)
        host_units = max(0, kv_host_bytes) // unit_bytes if prefix_caching else 0
        self.host = HostKV(self.kv, host_units) if host_units else None
        self.runner = StepRunner(model, pool, plot, self.kv)
        self.scheduler = GenerationScheduler(BlockManager(units, block_tokens, host_units), unit_bytes=unit_bytes,
                                             max_waiting=max_waiting, max_running=max_running,
                                             max_step_tokens=max_step_tokens, prefix_caching=prefix_caching,
                                             on_admit=self.runner.admit)
        self._prefetch = ThreadPoolExecutor(max_workers=4, thread_name_prefix="plot-prefetch")
        self._thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> TokenStream:
        dims = self.model.dims
        params = request.params
        length = len(request.prompt) + params.max_new_tokens
        if not len(request.prompt):
            raise InvalidArgument("the prompt is empty")
        if params.kv_budget and params.kv_budget < self.block_tokens or params.kv_budget < 0:
            raise InvalidArgument(f"kv_budget keeps at least {self.block_tokens} tokens (0: every token)")
        if any(not 0 <= t < dims.vocab for t in params.forced_tokens):
            raise InvalidArgument(f"forced tokens must lie in [0, {dims.vocab})")
        if length > dims.max_positions:
            raise InvalidArgument(f"prompt ({len(request.prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                                  f"exceeds the model's {dims.max_positions} positions")
        if not 0 <= request.split_layer < dims.layers:
            raise InvalidArgument(f"split layer {request.split_layer} is outside [0, {dims.layers})")
        if request.split_layer > 0 and self.plot is None:
            raise FailedPrecondition("this compute replica has no knowledge store for PLOT lookups")
        layers = dims.layers - request.split_layer
        if not self.scheduler.fits_pool(length, layers):
            need = self.scheduler.blocks.blocks_for(length) * layers * self.unit_bytes
            raise ResourceExhausted(f"this request can grow to {need >> 20} MiB of KV cache, more than compute's whole "
                                    f"budget of {self.kv_budget_bytes >> 20} MiB: lower max_new_tokens or the prompt")
        if params.output_pattern:
            request.output_index = self._compiled(params)
            request.output_eos = self.constraints.eos_token_id
        sequence = ScheduledSequence.of(request, layers, self.namespace, self.block_tokens)
        self.scheduler.check_room()   # before fetching anything for a request that would be refused
        # The adapter and the prompt's PLOT rows stream in while earlier requests' steps run.
        sequence.adapter_ready = self._prefetch.submit(contextvars.copy_context().run, self.pool.prefetch,
                                                       (request.tenant_id, request.adapter_version))
        if request.split_layer > 0:
            prompt = np.asarray(request.prompt, dtype=np.int32)
            sequence.prompt_rows = self._prefetch.submit(contextvars.copy_context().run, self.plot, request.domain,
                                                         [prompt], [0], [0])
        self.scheduler.enqueue(sequence)
        return sequence.stream

    def _compiled(self, params: SamplingParams):
        """The request's output pattern compiled (in the caller's thread: a new pattern can take seconds)."""
        if self.constraints is None:
            raise FailedPrecondition("this compute replica has no tokenizer to constrain output with")
        if params.forced_tokens:
            raise InvalidArgument("structured output cannot score a given continuation")
        if self.constraints.eos_token_id is None:
            raise FailedPrecondition("structured output needs the model's end-of-text token (eos_token_id in "
                                     "generation_config.json or config.json), which this model does not name")
        if self.constraints.eos_token_id not in params.stop_token_ids:
            raise InvalidArgument("structured output ends at the end-of-text token once the text is complete: it "
                                  "cannot be combined with ignore_eos")
        return self.constraints.index(params.output_pattern)

    def snapshot(self) -> EngineStats:
        return self.scheduler.snapshot()

    def close(self) -> None:
        self.scheduler.stop()
        self._thread.join(timeout=10)
        self._prefetch.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException:                 # a scheduler bug: every stream learns it, none waits forever
            log.exception("the generation engine stopped")
            self.scheduler.stop()
            self.scheduler.next_step(wait=False)
            raise

    def _steps(self) -> None:
        while (plan := self.scheduler.next_step()) is not None:
            if plan.copies:
                self.host.copy(self.kv, plan.copies.out, plan.copies.into)
            if not plan.running:
                time.sleep(0.005)   # only waiting requests (for room, or their adapter and prompt rows)
                continue
            try:
                sampled, details = self.runner.step(plan)
            except Exception as error:  # noqa: BLE001 - the step's sequences fail, the engine goes on
                log.exception("generation step of %d sequences failed", len(plan.running))
                self.scheduler.fail(plan.running, error)
                continue
            self.scheduler.complete_step(plan, sampled, details)
