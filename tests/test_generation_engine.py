"""Continuous batching of generative tenants against transformers' own generate (LoRA merged), in process:
tiny random-weight GPT-2 and Llama (grouped-query attention) built here, split layer 0."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from models.adapter_format import random_adapter
from models.decoder import DecoderModel
from models.dims import ModelDims
from models.kv_cache import KVPool
from models.loading import load_causal_lm
from models.lora_merge import merged_model
from services.common.errors import InvalidArgument, ResourceExhausted
from services.compute.adapter_pool import AdapterPool
from services.compute.generation import GenerationEngine
from services.compute.generation_scheduler import GenerationRequest, SamplingParams
from services.compute.kv_blocks import BLOCK_TOKENS
from services.compute.sampling import penalise, sample

TARGETS = {"gpt2": ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"),
           "llama": ("query", "key", "value", "attn_out", "ffn_in", "ffn_gate", "ffn_out")}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder_dir(request, tmp_path_factory):
    from tests.helpers import tiny_decoder
    return tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))


def make_engine(model_dir, adapters, kv_budget=64 << 20, fetch=None, **kwargs):
    model = DecoderModel(model_dir, torch.device("cpu"))
    pool = AdapterPool(model.dims, torch.device("cpu"), slots=8, max_rank=8, host_cache_bytes=64 << 20,
                       fetch=fetch or (lambda tenant, version: adapters[tenant]))
    return GenerationEngine(model, pool, None, kv_budget_bytes=kv_budget, **kwargs)


def tenant_adapters(dims: ModelDims, count: int) -> dict:
    return {f"t{i}": random_adapter(dims, num_labels=0, rank=4, first_layer=0, targets=TARGETS[dims.family],
                                    seed=i + 1) for i in range(count)}


def request(tenant: str, prompt, **params) -> GenerationRequest:
    return GenerationRequest(tenant, 1, "", 0, np.asarray(prompt), SamplingParams(**params))


def reference_greedy(model_dir, adapter, prompt, new_tokens: int, **generate_kwargs) -> list[int]:
    model = merged_model(load_causal_lm(model_dir), adapter)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         min_new_tokens=new_tokens, pad_token_id=0, **generate_kwargs)
    return out[0, len(prompt):].tolist()


def generate_all(decoder_dir, adapters, jobs, **engine_kwargs):
    """Submits every (tenant, prompt, new tokens) job at once, greedy; their tokens, streams and the final stats."""
    engine = make_engine(decoder_dir, adapters, **engine_kwargs)
    try:
        streams = [engine.submit(request(tenant, prompt, max_new_tokens=count)) for tenant, prompt, count in jobs]
        produced = [list(stream) for stream in streams]
        return produced, streams, engine.snapshot()
    finally:
        engine.close()


def test_mixed_tenants_joining_at_different_steps_match_transformers_generate(decoder_dir):
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, dims.vocab, size=n).tolist() for n in (5, 9, 3, 7)]
    tenants = ["t0", "t1", "t2", "t0"]
    new_tokens = [12, 6, 10, 8]
    # Two run at once: the third and fourth join (prefill) when others finish, beside one still decoding.
    produced, streams, stats = generate_all(decoder_dir, adapters, zip(tenants, prompts, new_tokens),
                                            max_running=2)
    for tenant, prompt, count, tokens, stream in zip(tenants, prompts, new_tokens, produced, streams):
        assert tokens == reference_greedy(decoder_dir, adapters[tenant], prompt, count)
        assert stream.finish_reason == "length"
    assert stats.kv_bytes_used == 0 and stats.running == 0
    assert stats.steps < sum(new_tokens) - 12, "sequences must share steps"


def test_long_prompts_prefill_in_chunks_and_still_match_transformers(decoder_dir):
    """A step feeds at most 3 tokens: prompts of 11 and 17 tokens are prefilled over several steps, beside a
    sequence that keeps decoding, and every token is still the merged model's."""
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 2)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, dims.vocab, size=n).tolist() for n in (2, 11, 17)]
    tenants, new_tokens = ["t0", "t1", "t0"], [14, 5, 6]
    produced, _, stats = generate_all(decoder_dir, adapters, zip(tenants, prompts, new_tokens), max_running=2,
                                      max_step_tokens=3)
    for tenant, prompt, count, tokens in zip(tenants, prompts, new_tokens, produced):
        assert tokens == reference_greedy(decoder_dir, adapters[tenant], prompt, count)
    assert stats.largest_step <= 3 and stats.prompt_tokens == 2 + 11 + 17
    assert stats.steps >= (11 + 17) // 3


def test_same_seed_same_tokens_and_sampling_limits(decoder_dir):
    dims = ModelDims.from_dir(decoder_dir)
    engine = make_engine(decoder_dir, tenant_adapters(dims, 1))
    try:
        params = dict(max_new_tokens=10, temperature=1.3, top_k=20, top_p=0.9)
        first = list(engine.submit(request("t0", [5, 6, 7], seed=7, **params)))
        again = list(engine.submit(request("t0", [5, 6, 7], seed=7, **params)))
        other = [list(engine.submit(request("t0", [5, 6, 7], seed=s, **params))) for s in (8, 9, 10)]
        assert first == again
        assert any(o != first for o in other), "different seeds should draw different text"
        stop = first[3]
        stopped = engine.submit(request("t0", [5, 6, 7], seed=7, stop_token_ids=(stop,), **params))
        assert list(stopped)[-1] == stop and stopped.finish_reason == "stop"
        with pytest.raises(InvalidArgument, match="positions"):
            engine.submit(request("t0", [1] * 10, max_new_tokens=dims.max_positions))
        with pytest.raises(InvalidArgument, match="empty"):
            engine.submit(request("t0", []))
    finally:
        engine.close()


def held_engine(decoder_dir, adapters, **kwargs):
    """An engine whose steps wait for the test's permits (`steps.release(n)` lets n steps run)."""
    engine = make_engine(decoder_dir, adapters, **kwargs)
    steps = threading.Semaphore(0)
    acquire = engine.pool.acquire
    engine.pool.acquire = lambda keys: steps.acquire() and acquire(keys)
    return engine, steps


def blocks_budget(dims: ModelDims, blocks: int) -> int:
    return blocks * KVPool.unit_bytes(dims, BLOCK_TOKENS) * dims.layers


@pytest.mark.parametrize("host_blocks", [0, 8])
def test_paged_kv_runs_what_whole_reservations_could_not_and_preempts_the_youngest_exactly(decoder_dir, host_blocks):
    """Four blocks of KV: two sequences that each grow to three blocks run side by side (a reservation of
    prompt + max new tokens would run one at a time); when the pool runs out the younger is preempted,
    recomputed later (with a host tier: its full blocks the pool gave up meanwhile copied back), and both
    still give the merged model's tokens."""
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 2)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, dims.vocab, size=8).tolist() for _ in range(2)]
    engine, steps = held_engine(decoder_dir, adapters, kv_budget=blocks_budget(dims, 4),
                                kv_host_bytes=blocks_budget(dims, host_blocks))
    try:
        streams = [engine.submit(request(f"t{i}", prompt, max_new_tokens=40)) for i, prompt in enumerate(prompts)]
        steps.release(1000)
        produced = [list(stream) for stream in streams]
        stats = engine.snapshot()
        for i, (prompt, tokens) in enumerate(zip(prompts, produced)):
            assert tokens == reference_greedy(decoder_dir, adapters[f"t{i}"], prompt, 40)
        assert stats.preemptions >= 1
        assert stats.kv_bytes_used == 0 and stats.running == 0
    finally:
        steps.release(1000)
        engine.close()


def test_requests_wait_for_blocks_a_too_long_one_is_refused_and_cancel_frees_the_blocks(decoder_dir):
    dims = ModelDims.from_dir(decoder_dir)
    engine, steps = held_engine(decoder_dir, tenant_adapters(dims, 1), kv_budget=blocks_budget(dims, 3),
                                max_waiting=1, prefix_caching=False)
    try:
        first = engine.submit(request("t0", [4] * 20, max_new_tokens=20))     # two blocks from the start
        while engine.snapshot().running == 0:   # admitted, then held before its first step
            time.sleep(0.01)
        second = engine.submit(request("t0", [5] * 20, max_new_tokens=8))     # two blocks + one spare: waits
        steps.release(3)
        tokens = iter(first)
        [next(tokens) for _ in range(3)]
        assert engine.snapshot().running == 1 and engine.snapshot().waiting == 1
        assert engine.snapshot().kv_bytes_used == blocks_budget(dims, 2)
        with pytest.raises(ResourceExhausted, match="waiting"):
            engine.submit(request("t0", [6] * 8, max_new_tokens=8))
        with pytest.raises(ResourceExhausted, match="budget"):
            engine.submit(request("t0", [6] * 8, max_new_tokens=48))        # 56 tokens: four blocks > three
        first.cancel()                      # the client went away: its blocks go to the waiting request
        steps.release(100)
        assert len(list(tokens)) <= 1 and first.finish_reason == "cancelled"   # the step under way may finish
        assert len(list(second)) == 8 and second.finish_reason == "length"
        assert engine.snapshot().kv_bytes_used == 0
    finally:
        steps.release(1000)
        engine.close()


def test_a_repeated_prompt_reuses_its_tenants_blocks_and_no_one_elses(decoder_dir):
    """A 40-token prompt: its two full blocks are kept after the first request; the same tenant and adapter
    version skips them, another tenant or another version of the adapter computes its own, and everyone gets
    their own merged model's tokens."""
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 2)
    version_two = random_adapter(dims, num_labels=0, rank=4, first_layer=0, targets=TARGETS[dims.family], seed=99)
    prompt = np.random.default_rng(3).integers(3, dims.vocab, size=40).tolist()
    engine = make_engine(decoder_dir, adapters,
                         fetch=lambda tenant, version: version_two if version == 2 else adapters[tenant])
    try:
        def run(tenant: str, version: int = 1) -> tuple[list[int], int]:
            before = engine.snapshot().prefix_hits
            stream = engine.submit(GenerationRequest(tenant, version, "", 0, np.asarray(prompt),
                                                     SamplingParams(max_new_tokens=6)))
            return list(stream), engine.snapshot().prefix_hits - before

        first, hits = run("t0")
        assert hits == 0 and first == reference_greedy(decoder_dir, adapters["t0"], prompt, 6)
        again, hits = run("t0")
        assert hits == 32 and again == first                               # two blocks of 16 skipped
        other, hits = run("t1")
        assert hits == 0 and other == reference_greedy(decoder_dir, adapters["t1"], prompt, 6)
        newer, hits = run("t0", version=2)
        assert hits == 0 and newer == reference_greedy(decoder_dir, version_two, prompt, 6)
        assert engine.snapshot().kv_bytes_cached > 0 and engine.snapshot().kv_bytes_used == 0
    finally:
        engine.close()


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, -5.0, -6.0])
    generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, SamplingParams(temperature=1.0, top_k=2), generator) for _ in range(200)}
    assert drawn == {0, 1}
    drawn = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), generator) for _ in range(200)}
    assert drawn == {0}
    assert sample(logits, SamplingParams(), generator) == 0


def test_a_request_whose_adapter_cannot_be_fetched_fails_alone(decoder_dir):
    dims = ModelDims.from_dir(decoder_dir)
    engine = make_engine(decoder_dir, tenant_adapters(dims, 1))      # no adapter for "ghost"
    try:
        good = engine.submit(request("t0", [5, 6, 7], max_new_tokens=6))
        ghost = engine.submit(request("ghost", [5, 6, 7], max_new_tokens=6))
        with pytest.raises(KeyError):
            list(ghost)
        assert len(list(good)) == 6 and good.finish_reason == "length"
        assert engine.snapshot().kv_bytes_used == 0
    finally:
        engine.close()


def test_an_int8_kv_pool_scores_prompts_close_to_fp32_in_a_quarter_of_the_memory(decoder_dir):
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 1)
    prompt = np.random.default_rng(4).integers(3, dims.vocab, size=30)
    scored = {}
    for kv_dtype in ("float32", "int8"):
        engine = make_engine(decoder_dir, adapters, kv_budget=1 << 20, kv_dtype=kv_dtype)
        try:
            stream = engine.submit(request("t0", prompt, max_new_tokens=1, prompt_logprobs=True))
            details = [d for _token, d in stream.with_details()][0]
            scored[kv_dtype] = (np.array([p.logprob for p in details.prompt_logprobs]), engine.kv.units)
        finally:
            engine.close()
    (exact, fp32_units), (rounded, int8_units) = scored["float32"], scored["int8"]
    assert len(exact) == len(rounded) == 29
    assert np.abs(exact - rounded).mean() < 0.05 and not np.array_equal(exact, rounded)
    head_dim = dims.head_dim
    assert int8_units == pytest.approx(fp32_units * 4 * head_dim / (head_dim + 4), rel=0.01)   # same MiB


def test_bfloat16_base_weights_score_close_to_float32_and_gpt2_is_refused(decoder_dir):
    dims = ModelDims.from_dir(decoder_dir)
    if dims.family == "gpt2":
        with pytest.raises(ValueError, match="nn.Linear projections"):
            DecoderModel(decoder_dir, torch.device("cpu"), weights="bfloat16")
        return
    adapters = tenant_adapters(dims, 1)
    prompt = np.random.default_rng(5).integers(3, dims.vocab, size=30)
    scored = {}
    for weights in ("float32", "bfloat16"):
        model = DecoderModel(decoder_dir, torch.device("cpu"), weights=weights)
        pool = AdapterPool(model.dims, torch.device("cpu"), slots=8, max_rank=8, host_cache_bytes=64 << 20,
                           fetch=lambda tenant, version: adapters[tenant])
        engine = GenerationEngine(model, pool, None, kv_budget_bytes=1 << 20)
        try:
            stream = engine.submit(request("t0", prompt, max_new_tokens=1, prompt_logprobs=True))
            details = [d for _token, d in stream.with_details()][0]
            scored[weights] = np.array([p.logprob for p in details.prompt_logprobs])
        finally:
            engine.close()
        linear_types = {type(m).__name__ for m in model.blocks[0].self_attn.children()} | {type(model.model.lm_head).__name__}
        assert linear_types == ({"Linear"} if weights == "float32" else {"BF16Linear"})
    difference = np.abs(scored["float32"] - scored["bfloat16"])
    assert difference.mean() < 0.1 and difference.max() > 0     # rounded, and close
    with pytest.raises(ValueError, match="decoder weights"):
        DecoderModel(decoder_dir, torch.device("cpu"), weights="int4")


def test_a_kv_budget_keeps_the_first_tokens_exact_then_scores_a_continuation_from_fewer_keys(decoder_dir):
    """Forced continuation of a 40-token prompt, scored token by token: with a budget of 32 tokens the
    sequence is cut once it holds 48, so the log-probabilities before that equal the full cache's and the
    later ones come from 32 kept keys (close, not equal)."""
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 1)
    rng = np.random.default_rng(6)
    prompt, continuation = rng.integers(3, dims.vocab, size=40), rng.integers(3, dims.vocab, size=30).tolist()
    scored = {}
    for budget in (0, 32):
        engine = make_engine(decoder_dir, adapters)
        try:
            stream = engine.submit(request("t0", prompt, max_new_tokens=30, logprobs=True, kv_budget=budget,
                                           forced_tokens=tuple(continuation)))
            steps = [(token, details.logprob.logprob) for token, details in stream.with_details()]
            assert [token for token, _ in steps] == continuation
            scored[budget] = np.array([logprob for _, logprob in steps])
        finally:
            engine.close()
    full, budgeted = scored[0], scored[32]
    np.testing.assert_array_equal(full[:9], budgeted[:9])      # tokens 40..48 fed before the first cut
    assert not np.array_equal(full[9:], budgeted[9:])
    assert np.abs(full - budgeted).mean() < 1.0
    with pytest.raises(InvalidArgument, match="kv_budget"):
        make_engine(decoder_dir, adapters).submit(request("t0", prompt, kv_budget=3))


def test_penalties_match_transformers_repetition_penalty_and_openai_s_formula():
    """Against independent references: transformers' RepetitionPenaltyLogitsProcessor, and OpenAI's documented
    formula written out token by token."""
    from transformers import RepetitionPenaltyLogitsProcessor
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=generator) * 3
    prompt, generated = np.array([3, 7, 7, 11]), [7, 20, 20, 20, 41]
    params = SamplingParams(repetition_penalty=1.7)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt.tolist() + generated]), logits[None])[0]
    torch.testing.assert_close(penalise(logits, params, prompt, generated), expected, rtol=0, atol=0)

    params = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.3)
    expected = logits.clone()
    for token in set(generated):                       # the prompt's tokens are not penalised
        expected[token] -= generated.count(token) * -0.3 + 0.5
    torch.testing.assert_close(penalise(logits, params, prompt, generated), expected)
    assert torch.equal(penalise(logits, params, prompt, []), logits)
    assert not SamplingParams().penalised and params.penalised


def test_greedy_generation_with_penalties_matches_the_references(decoder_dir):
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, dims.vocab, size=n).tolist() for n in (6, 4)]
    engine = make_engine(decoder_dir, adapters)
    try:
        penalised = engine.submit(request("t0", prompts[0], max_new_tokens=10, repetition_penalty=1.8))
        plain = engine.submit(request("t1", prompts[1], max_new_tokens=10))           # the same steps, unpenalised
        frequency = engine.submit(request("t1", prompts[1], max_new_tokens=10, frequency_penalty=2.0,
                                          presence_penalty=1.0))
        penalised, plain, frequency = list(penalised), list(plain), list(frequency)
    finally:
        engine.close()
    assert penalised == reference_greedy(decoder_dir, adapters["t0"], prompts[0], 10, repetition_penalty=1.8)
    assert plain == reference_greedy(decoder_dir, adapters["t1"], prompts[1], 10)

    model = merged_model(load_causal_lm(decoder_dir), adapters["t1"])    # OpenAI's penalties, step by step
    ids, expected = list(prompts[1]), []
    with torch.no_grad():
        for _ in range(10):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            for token in set(expected):
                logits[token] -= 2.0 * expected.count(token) + 1.0
            expected.append(int(torch.argmax(logits)))
            ids.append(expected[-1])
    assert frequency == expected and frequency != plain


def generated_with_hits(engine, tenant: str, tokens: list[int]) -> tuple[list[int], int]:
    """Greedy tokens of one request, and the prompt tokens the prefix cache gave it."""
    before = engine.snapshot().prefix_hits
    out = list(engine.submit(GenerationRequest(tenant, 1, "", 0, np.asarray(tokens), SamplingParams(max_new_tokens=6))))
    return out, engine.snapshot().prefix_hits - before


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_a_conversation_pushed_out_of_the_pool_comes_back_from_the_host_tier(decoder_dir, kv_dtype):
    """A pool of 16 units (4 blocks of a 4-layer model): other tenants' prompts push the first prompt's blocks
    out; with a host tier its next request still skips them, and its tokens stay the merged model's."""
    dims = ModelDims.from_dir(decoder_dir)
    adapters = tenant_adapters(dims, 3)
    rng = np.random.default_rng(5)
    prompt, others = (rng.integers(3, dims.vocab, size=40).tolist(),
                      [rng.integers(3, dims.vocab, size=40).tolist() for _ in range(2)])
    unit = KVPool.unit_bytes(dims, BLOCK_TOKENS, kv_dtype)
    results = {}
    for host_units in (0, 32):
        engine = make_engine(decoder_dir, adapters, kv_budget=16 * unit, kv_dtype=kv_dtype,
                             kv_host_bytes=host_units * unit)
        try:
            first, _ = generated_with_hits(engine, "t0", prompt)
            for i, other in enumerate(others):
                generated_with_hits(engine, f"t{i + 1}", other)
            again, hits = generated_with_hits(engine, "t0", prompt)
            results[host_units] = (first, again, hits, engine.snapshot())
        finally:
            engine.close()
    first, again, hits, stats = results[0]
    assert hits == 0 and again == first and stats.swapped_in == 0      # without it, computed again
    first, again, hits, stats = results[32]
    assert hits == 32 and stats.swapped_in == 2 and stats.swapped_out >= 2 and again == first
    if kv_dtype == "float32":
        assert first == reference_greedy(decoder_dir, adapters["t0"], prompt, 6)
