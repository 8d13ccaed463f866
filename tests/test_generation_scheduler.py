"""The generation scheduler and its KV block accounting alone, without tensors: admission order, paged KV
blocks, preemption, prefix caching, chunked prefill, queue bound, cancellation. A step is simulated by
sampling token 7 for whoever finished feeding."""
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
from services.compute.kv_blocks import BlockManager

SIZE = 4    # tokens per block in these tests


def scheduler_of(blocks: int, layers: int = 1, **kwargs) -> GenerationScheduler:
    return GenerationScheduler(BlockManager(blocks * layers, block_tokens=SIZE), unit_bytes=1, **kwargs)


def sequence(prompt_tokens: int, new_tokens: int = 4, fetched: bool = True, tenant: str = "t", layers: int = 1,
             first_token: int = 1, **params) -> ScheduledSequence:
    request = GenerationRequest(tenant, 1, "", 0, np.arange(first_token, first_token + prompt_tokens),
                                SamplingParams(max_new_tokens=new_tokens, **params))
    scheduled = ScheduledSequence.of(request, layers, block_tokens=SIZE)
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


def units_of(s: ScheduledSequence) -> list[tuple[int, ...]]:
    return [block.units for block in s.blocks]


def test_the_scheduler_needs_no_tensor_library():
    check = "import sys, services.compute.generation_scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_requests_are_admitted_first_come_first_served_and_never_overtaken():
    admitted = []
    scheduler = scheduler_of(5, on_admit=admitted.append)
    first, big, small = sequence(8), sequence(12), sequence(3)      # 2, 3 and 1 blocks
    for s in (first, big, small):
        scheduler.enqueue(s)
    plan = scheduler.next_step(wait=False)
    # `big` does not fit beside `first` with a block to spare for it; `small` would, but waits behind it.
    assert admitted == [first] and plan.running == [first]
    assert scheduler.snapshot().waiting == 2 and scheduler.snapshot().kv_bytes_used == 2


def test_the_head_waits_for_its_fetches_and_a_failed_fetch_fails_alone():
    scheduler = scheduler_of(10)
    pending, after = sequence(3, fetched=False), sequence(3)
    scheduler.enqueue(pending)
    scheduler.enqueue(after)
    assert scheduler.next_step(wait=False).running == []        # head not fetched yet: nobody overtakes it
    pending.adapter_ready.set_exception(KeyError("no adapter"))
    assert scheduler.next_step(wait=False).running == [after]
    assert isinstance(events(pending)[0], KeyError)


def test_blocks_are_taken_as_tokens_arrive_and_given_back_at_the_end():
    scheduler = scheduler_of(8, layers=3, prefix_caching=False)
    s = sequence(3, new_tokens=6, layers=3)
    scheduler.enqueue(s)
    run_step(scheduler)                              # prompt of 3: one block of 3 units (one per layer)
    assert len(s.blocks) == 1 and all(len(u) == 3 for u in units_of(s))
    run_step(scheduler)                              # feeds token 4 (position 3): still the first block
    assert len(s.blocks) == 1
    run_step(scheduler)                              # position 4: a second block
    assert len(s.blocks) == 2 and scheduler.snapshot().kv_bytes_used == 6
    while scheduler.snapshot().running:
        run_step(scheduler)
    assert events(s) == [7] * 6 + ["length"]
    assert scheduler.snapshot().kv_bytes_used == 0 and scheduler.blocks.available() == 24


def test_when_the_pool_runs_out_the_youngest_is_preempted_and_resumes_before_new_requests():
    scheduler = scheduler_of(4, prefix_caching=False)
    old, young = sequence(3, new_tokens=9), sequence(3, new_tokens=9)    # each grows to 3 blocks
    scheduler.enqueue(old)
    scheduler.enqueue(young)
    run_step(scheduler)
    assert scheduler.snapshot().running == 2
    later = sequence(2, new_tokens=2)
    scheduler.enqueue(later)
    preempted_at = None
    for step in range(40):
        plan = run_step(scheduler)
        if preempted_at is None and young not in plan.running:
            preempted_at = step
            assert young.blocks == [] and young.pending == young.tokens      # it recomputes every token
            assert old in plan.running and later not in plan.running         # new requests wait behind it
        if not scheduler.snapshot().running and not scheduler.snapshot().waiting:
            break
    assert preempted_at is not None and scheduler.snapshot().preemptions >= 1
    assert events(old) == [7] * 9 + ["length"]                  # the oldest was never preempted
    assert events(young) == [7] * 9 + ["length"]                # the preempted one finished all its tokens
    assert events(later) == [7] * 2 + ["length"]
    assert scheduler.snapshot().kv_bytes_used == 0


def test_a_sequence_alone_always_fits_so_preemption_never_starves_it():
    scheduler = scheduler_of(3, prefix_caching=False)
    assert not scheduler.fits_pool(13, 1) and scheduler.fits_pool(12, 1)
    s = sequence(4, new_tokens=8)                                # 12 tokens: exactly the pool
    scheduler.enqueue(s)
    for _ in range(20):
        run_step(scheduler)
    assert events(s) == [7] * 8 + ["length"] and scheduler.snapshot().preemptions == 0


def test_full_blocks_are_reused_by_the_same_tenant_never_by_another_and_the_last_token_is_always_fed():
    scheduler = scheduler_of(20)
    first = sequence(8, new_tokens=1)                            # two full blocks of prompt
    scheduler.enqueue(first)
    run_step(scheduler)
    assert events(first) == [7, "length"]
    assert scheduler.snapshot().kv_bytes_cached == 2             # kept, held by nobody
    again, other = sequence(8, new_tokens=1), sequence(8, new_tokens=1, tenant="u")
    scheduler.enqueue(again)
    scheduler.enqueue(other)
    plan = scheduler.next_step(wait=False)
    # Same tenant: the first block is reused; the second holds the last prompt token, whose logits are needed.
    assert plan.feeds[again] == 4 and again.blocks[0].units == first_units(scheduler, again)
    assert plan.feeds[other] == 8 and not set(units_of(other)) & set(units_of(again))
    assert scheduler.snapshot().prefix_hits == 4 and scheduler.snapshot().prefix_queries == 8 * 3


def first_units(scheduler: GenerationScheduler, s: ScheduledSequence) -> tuple[int, ...]:
    """The units the prefix cache holds under the sequence's first key."""
    return scheduler.blocks._cached[s.prefix.keys[0]].units


def test_a_longer_history_reuses_the_blocks_of_a_shorter_one_and_different_tokens_do_not():
    scheduler = scheduler_of(20)
    turn = sequence(9, new_tokens=4)
    scheduler.enqueue(turn)
    while scheduler.snapshot().running or scheduler.snapshot().waiting:
        run_step(scheduler)
    history = [int(t) for t in turn.request.prompt] + [7, 7, 7]        # 12 tokens: three full blocks were fed
    follow = ScheduledSequence.of(GenerationRequest("t", 1, "", 0, np.asarray(history + [5, 6]),
                                                    SamplingParams(max_new_tokens=1)), 1, block_tokens=SIZE)
    follow.adapter_ready = Future()
    follow.adapter_ready.set_result(None)
    changed = sequence(14, new_tokens=1, first_token=2)
    scheduler.enqueue(follow)
    scheduler.enqueue(changed)
    plan = scheduler.next_step(wait=False)
    assert plan.feeds[follow] == 2 and plan.feeds[changed] == 14


def test_prompt_logprobs_requests_compute_their_whole_prompt():
    scheduler = scheduler_of(20)
    scheduler.enqueue(sequence(8, new_tokens=1))
    run_step(scheduler)
    scored = sequence(8, new_tokens=1, prompt_logprobs=True)
    scheduler.enqueue(scored)
    assert scheduler.next_step(wait=False).feeds[scored] == 8


def test_cached_blocks_nobody_holds_are_evicted_least_recently_used_first():
    scheduler = scheduler_of(4)
    a, b = sequence(4, new_tokens=1, first_token=10), sequence(4, new_tokens=1, first_token=20)
    for s in (a, b):                                             # each leaves one full prompt block cached
        scheduler.enqueue(s)
        run_step(scheduler)
    assert scheduler.snapshot().kv_bytes_cached == 2
    big = sequence(11, new_tokens=1, first_token=30)             # three blocks: one cached block must go
    scheduler.enqueue(big)
    run_step(scheduler)
    assert scheduler.snapshot().evictions == 1
    assert scheduler.blocks.match(a.prefix.keys[:1], 1) == []    # the older one went
    assert len(scheduler.blocks.match(b.prefix.keys[:1], 1)) == 1


def test_queue_bound_and_shutdown_refuse_requests():
    scheduler = scheduler_of(10, max_waiting=1)
    scheduler.enqueue(sequence(2))
    with pytest.raises(ResourceExhausted, match="waiting"):
        scheduler.enqueue(sequence(2))
    scheduler.stop()
    with pytest.raises(FailedPrecondition, match="shutting down"):
        scheduler.check_room()


def test_chunked_prefill_feeds_decoding_sequences_first_then_prompts_in_arrival_order():
    scheduler = scheduler_of(100, max_step_tokens=8, max_running=4)
    decoding = sequence(2, new_tokens=10)
    scheduler.enqueue(decoding)
    run_step(scheduler)                                          # prefill: now it decodes one token a step
    long_prompt, short_prompt = sequence(12, first_token=50), sequence(3, first_token=80)
    scheduler.enqueue(long_prompt)
    scheduler.enqueue(short_prompt)
    plan = run_step(scheduler)
    assert plan.feeds == {decoding: 1, long_prompt: 7}           # the rest of the budget goes to the first prompt
    plan = run_step(scheduler)
    assert plan.feeds == {decoding: 1, long_prompt: 5, short_prompt: 2}
    assert events(long_prompt) == [7]                            # sampled once its whole prompt was fed
    assert scheduler.snapshot().largest_step == 8 and scheduler.snapshot().prompt_tokens == 2 + 12 + 2


def test_a_prompt_progresses_even_when_decoding_sequences_fill_the_step():
    scheduler = scheduler_of(100, max_step_tokens=2, max_running=4)
    decoders = [sequence(1, new_tokens=20, first_token=i + 1) for i in range(3)]
    for s in decoders:
        scheduler.enqueue(s)
    run_step(scheduler)
    run_step(scheduler)                                          # three prompts of one token, two per step
    prompt = sequence(40, first_token=100)
    scheduler.enqueue(prompt)
    plan = run_step(scheduler)
    assert all(plan.feeds[s] == 1 for s in decoders) and plan.feeds[prompt] == PREFILL_CHUNK_MIN


def test_cancellation_frees_a_running_sequence_and_drops_a_waiting_one():
    scheduler = scheduler_of(2, prefix_caching=False)
    running, waiting, later = sequence(5), sequence(5), sequence(5)     # two blocks each
    for s in (running, waiting, later):
        scheduler.enqueue(s)
    run_step(scheduler)
    running.stream.cancel()
    waiting.stream.cancel()
    plan = run_step(scheduler)
    assert plan.running == [later]                               # the blocks went to the next request in line
    assert events(running)[-1] == "cancelled" and events(waiting) == ["cancelled"]
    assert running.state is None and running.blocks == [] and scheduler.snapshot().kv_bytes_used == 2


def test_stop_tokens_finish_and_a_failed_step_fails_its_sequences():
    scheduler = scheduler_of(10)
    stopping, failing = sequence(2, stop_token_ids=(7,)), sequence(2)
    scheduler.enqueue(stopping)
    run_step(scheduler)
    assert events(stopping) == [7, "stop"]
    scheduler.enqueue(failing)
    plan = scheduler.next_step(wait=False)
    scheduler.fail(plan.running, RuntimeError("step failed"))
    assert isinstance(events(failing)[0], RuntimeError) and scheduler.snapshot().kv_bytes_used == 0


def test_a_kv_budget_cuts_a_decoding_sequence_to_fresh_blocks_and_never_registers_them():
    scheduler = scheduler_of(20)
    s = sequence(6, new_tokens=20, kv_budget=8)
    scheduler.enqueue(s)
    compacted = []
    while scheduler.snapshot().running or scheduler.snapshot().waiting:
        plan = scheduler.next_step(wait=False)
        if s in plan.compactions:
            c = plan.compactions[s]
            assert c.keep == 8 and c.held >= 8 + SIZE and len(c.blocks) == 3      # 8 kept + the next token
            assert not {b.units for b in c.blocks} & {b.units for b in s.blocks}
            compacted.append(c.held)
        scheduler.complete_step(plan, {x: 7 for x in plan.sequences if plan.samples(x)})
        if s.blocks:
            assert s.held <= 8 + SIZE and s.computed == s.held + s.evicted
    assert events(s) == [7] * 20 + ["length"]
    assert compacted and s.evicted > 0
    # Only the plain blocks filled before the first cut (12 tokens) were kept for reuse; the rest went back.
    assert scheduler.blocks.cached_blocks() == 12 // SIZE and scheduler.snapshot().kv_bytes_used == 0
    assert scheduler.blocks.available() == 20


def test_a_failed_step_gives_back_the_blocks_of_its_compactions():
    scheduler = scheduler_of(20, prefix_caching=False)
    s = sequence(11, new_tokens=10, kv_budget=4)
    scheduler.enqueue(s)
    while True:
        plan = scheduler.next_step(wait=False)
        if plan.compactions:
            break
        scheduler.complete_step(plan, {x: 7 for x in plan.sequences if plan.samples(x)})
    scheduler.fail(plan.running, RuntimeError("step failed"))
    assert scheduler.blocks.available() == 20 and scheduler.snapshot().kv_bytes_used == 0


def test_a_block_the_pool_gives_up_waits_in_the_host_tier_and_comes_back_on_a_hit():
    scheduler = GenerationScheduler(BlockManager(4, block_tokens=SIZE, host_units=2), unit_bytes=1)
    a, b = sequence(4, new_tokens=1, first_token=10), sequence(4, new_tokens=1, first_token=20)
    for s in (a, b):                                             # each leaves one full prompt block cached
        scheduler.enqueue(s)
        run_step(scheduler)
    (a_unit,) = first_units(scheduler, a)
    big = sequence(11, new_tokens=1, first_token=30)             # three blocks: a's cached block must go
    scheduler.enqueue(big)
    plan = run_step(scheduler)
    assert len(plan.copies.out) == 1 and plan.copies.out[0][0] == a_unit and plan.copies.into == []
    host_unit = plan.copies.out[0][1]
    stats = scheduler.snapshot()
    assert stats.evictions == 1 and stats.swapped_out == 1 and stats.kv_host_bytes_cached == 1
    # a's conversation goes on: its first block is copied back into the pool instead of computed again
    again = sequence(6, new_tokens=1, first_token=10)
    scheduler.enqueue(again)
    plan = scheduler.next_step(wait=False)
    assert plan.copies.into == [(host_unit, again.blocks[0].units[0])]
    assert plan.feeds[again] == 2 and scheduler.snapshot().prefix_hits == 4 and scheduler.snapshot().swapped_in == 1
    # what this plan copies out never lands where its copy in still reads
    assert host_unit not in {h for _, h in plan.copies.out}
    assert not scheduler.blocks.take_copies()                     # each copy is handed out once


def test_without_a_host_tier_a_given_up_block_is_gone():
    scheduler = scheduler_of(4)
    a, b = sequence(4, new_tokens=1, first_token=10), sequence(4, new_tokens=1, first_token=20)
    for s in (a, b):
        scheduler.enqueue(s)
        run_step(scheduler)
    scheduler.enqueue(sequence(11, new_tokens=1, first_token=30))
    plan = run_step(scheduler)
    assert not plan.copies and scheduler.snapshot().swapped_out == 0
    again = sequence(6, new_tokens=1, first_token=10)
    scheduler.enqueue(again)
    assert scheduler.next_step(wait=False).feeds[again] == 6


def test_a_kv_budget_computes_its_whole_prompt_so_every_prompt_token_is_scored():
    scheduler = scheduler_of(20)
    first = sequence(8, new_tokens=1)
    scheduler.enqueue(first)
    run_step(scheduler)
    assert scheduler.snapshot().kv_bytes_cached == 2
    budgeted, plain = sequence(8, new_tokens=1, kv_budget=4), sequence(8, new_tokens=1)
    scheduler.enqueue(budgeted)
    scheduler.enqueue(plain)
    plan = scheduler.next_step(wait=False)
    assert plan.feeds[budgeted] == 8 and plan.feeds[plain] == 4


def test_one_plan_never_copies_two_blocks_into_the_same_host_unit():
    """More blocks given up in one plan than the host tier holds: the later ones are dropped, not written over
    the earlier ones' host units (whose copies this plan still makes)."""
    manager = BlockManager(6, block_tokens=SIZE, host_units=2)
    for i in range(6):
        block = manager.allocate(1)
        manager.register(block, bytes([i]))
        manager.release(block)                  # cached, nobody holds it
    manager.take_copies()
    held = [manager.allocate(1) for _ in range(4)]          # evicts four cached blocks in one plan
    assert None not in held
    out = manager.take_copies().out
    assert len(out) == 2 and len({host for _, host in out}) == 2
    assert manager.stats.swapped_out == 2 and manager.stats.host_units_cached == 2
    # the next plan may reuse host units again: two more evictions replace the oldest host blocks
    more = [manager.allocate(1) for _ in range(2)]
    assert None not in more and len(manager.take_copies().out) == 2 and manager.stats.host_evictions == 2
