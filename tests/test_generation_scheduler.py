"""The generation scheduler alone, without tensors: admission order, KV budget, chunked prefill, queue
bound, cancellation. A step is simulated by sampling token 7 for whoever finished feeding."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import FailedPrecondition, ResourceExhausted
from services.compute.generation_scheduler import (
    PREFILL_CHUNK_MIN,
    GenerationRequest,
    GenerationScheduler,
    SamplingParams,
    ScheduledSequence,
    StepPlan,
)


def sequence(prompt_tokens: int, kv_bytes: int = 10, new_tokens: int = 4, fetched: bool = True,
             **params) -> ScheduledSequence:
    request = GenerationRequest("t", 1, "", 0, np.arange(1, prompt_tokens + 1),
                                SamplingParams(max_new_tokens=new_tokens, **params))
    scheduled = ScheduledSequence.of(request, kv_bytes)
    scheduled.adapter_ready = Future()
    if fetched:
        scheduled.adapter_ready.set_result(None)
    return scheduled


def run_step(scheduler: GenerationScheduler, token: int = 7) -> StepPlan:
    """Plans a step and completes it as a model would: the sequences that fed their last token get `token`."""
    plan = scheduler.next_step(wait=False)
    scheduler.complete_step(plan, {s: token for s in plan.sequences if plan.samples(s)})
    return plan


def events(scheduled: ScheduledSequence) -> list:
    out = []
    while not scheduled.stream._events.empty():
        event = scheduled.stream._events.get()
        out.append(event.token_id if event.token_id is not None else event.finish_reason or event.error)
    return out


def test_the_scheduler_needs_no_tensor_library():
    check = "import sys, services.compute.generation_scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_requests_are_admitted_first_come_first_served_and_never_overtaken():
    admitted = []
    scheduler = GenerationScheduler(kv_budget_bytes=100, on_admit=admitted.append)
    big, small = sequence(3, kv_bytes=80), sequence(3, kv_bytes=10)
    first = sequence(3, kv_bytes=30)
    for s in (first, big, small):
        scheduler.enqueue(s)
    plan = scheduler.next_step(wait=False)
    # `big` does not fit beside `first`; `small` would, but waits behind it.
    assert admitted == [first] and plan.running == [first]
    assert scheduler.snapshot().waiting == 2 and scheduler.snapshot().kv_bytes_used == 30


def test_the_head_waits_for_its_fetches_and_a_failed_fetch_fails_alone():
    scheduler = GenerationScheduler(kv_budget_bytes=100)
    pending, after = sequence(3, fetched=False), sequence(3)
    scheduler.enqueue(pending)
    scheduler.enqueue(after)
    assert scheduler.next_step(wait=False).running == []        # head not fetched yet: nobody overtakes it
    pending.adapter_ready.set_exception(KeyError("no adapter"))
    assert scheduler.next_step(wait=False).running == [after]
    assert isinstance(events(pending)[0], KeyError)


def test_kv_budget_admits_only_what_fits_and_a_finished_sequence_frees_it():
    scheduler = GenerationScheduler(kv_budget_bytes=50)
    first, second = sequence(2, kv_bytes=40, new_tokens=2), sequence(2, kv_bytes=40, new_tokens=2)
    scheduler.enqueue(first)
    scheduler.enqueue(second)
    assert run_step(scheduler).running == [first]               # prefill of `first`; `second` waits
    assert scheduler.snapshot().kv_bytes_used == 40 and scheduler.snapshot().waiting == 1
    run_step(scheduler)                                          # second token: `first` finishes at max_new_tokens
    assert events(first) == [7, 7, "length"]
    assert scheduler.snapshot().kv_bytes_used == 0 and scheduler.snapshot().running == 0
    assert run_step(scheduler).running == [second]


def test_queue_bound_and_shutdown_refuse_requests():
    scheduler = GenerationScheduler(kv_budget_bytes=10, max_waiting=1)
    scheduler.enqueue(sequence(2))
    with pytest.raises(ResourceExhausted, match="waiting"):
        scheduler.enqueue(sequence(2))
    scheduler.stop()
    with pytest.raises(FailedPrecondition, match="shutting down"):
        scheduler.check_room()


def test_chunked_prefill_feeds_decoding_sequences_first_then_prompts_in_arrival_order():
    scheduler = GenerationScheduler(kv_budget_bytes=1000, max_step_tokens=8, max_running=4)
    decoding = sequence(2, new_tokens=10)
    scheduler.enqueue(decoding)
    run_step(scheduler)                                          # prefill: now it decodes one token a step
    long_prompt, short_prompt = sequence(12), sequence(3)
    scheduler.enqueue(long_prompt)
    scheduler.enqueue(short_prompt)
    plan = run_step(scheduler)
    assert plan.feeds == {decoding: 1, long_prompt: 7}           # the rest of the budget goes to the first prompt
    plan = run_step(scheduler)
    assert plan.feeds == {decoding: 1, long_prompt: 5, short_prompt: 2}
    assert events(long_prompt) == [7]                            # sampled once its whole prompt was fed
    assert scheduler.snapshot().largest_step == 8 and scheduler.snapshot().prompt_tokens == 2 + 12 + 2


def test_a_prompt_progresses_even_when_decoding_sequences_fill_the_step():
    scheduler = GenerationScheduler(kv_budget_bytes=1000, max_step_tokens=2, max_running=4)
    decoders = [sequence(1, new_tokens=20) for _ in range(3)]
    for s in decoders:
        scheduler.enqueue(s)
    run_step(scheduler)
    run_step(scheduler)                                          # three prompts of one token, two per step
    prompt = sequence(40)
    scheduler.enqueue(prompt)
    plan = run_step(scheduler)
    assert all(plan.feeds[s] == 1 for s in decoders) and plan.feeds[prompt] == PREFILL_CHUNK_MIN


def test_cancellation_frees_a_running_sequence_and_drops_a_waiting_one():
    scheduler = GenerationScheduler(kv_budget_bytes=40)
    running, waiting, later = sequence(2, kv_bytes=40), sequence(2, kv_bytes=40), sequence(2, kv_bytes=40)
    for s in (running, waiting, later):
        scheduler.enqueue(s)
    run_step(scheduler)
    running.stream.cancel()
    waiting.stream.cancel()
    plan = run_step(scheduler)
    assert plan.running == [later]                               # the cache went to the next request in line
    assert events(running)[-1] == "cancelled" and events(waiting) == ["cancelled"]
    assert running.state is None and scheduler.snapshot().kv_bytes_used == 40


def test_stop_tokens_finish_and_a_failed_step_fails_its_sequences():
    scheduler = GenerationScheduler(kv_budget_bytes=100)
    stopping, failing = sequence(2, stop_token_ids=(7,)), sequence(2)
    scheduler.enqueue(stopping)
    run_step(scheduler)
    assert events(stopping) == [7, "stop"]
    scheduler.enqueue(failing)
    plan = scheduler.next_step(wait=False)
    scheduler.fail(plan.running, RuntimeError("step failed"))
    assert isinstance(events(failing)[0], RuntimeError) and scheduler.snapshot().kv_bytes_used == 0
