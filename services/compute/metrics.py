"""Compute's state as Prometheus metrics, read when scraped: adapter hits per tier (device slots, host cache,
fetched from the store), slots and host cache in use, and for decoders the KV cache and the sequences running
and waiting. Counters of batches, tokens and stage times live in pipeline.py."""
from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


def compute_state(pool, engine, model: str) -> Iterator:
    stats = pool.stats
    hits = CounterMetricFamily("hmi_compute_adapter_lookups", "adapters a batch or stream needed, by where they "
                               "were found: device (a slot), host (the host cache), store (fetched)",
                               labels=["model", "tier"])
    hits.add_metric([model, "device"], stats.device_hits)
    hits.add_metric([model, "host"], stats.host_hits)
    hits.add_metric([model, "store"], stats.misses)
    evictions = CounterMetricFamily("hmi_compute_adapter_evictions", "adapters evicted from device slots",
                                    labels=["model"])
    evictions.add_metric([model], stats.evictions)
    slots = GaugeMetricFamily("hmi_compute_adapter_slots", "device adapter slots, by state", labels=["model", "state"])
    used = pool.used_slots()
    slots.add_metric([model, "used"], used)
    slots.add_metric([model, "free"], pool.num_slots - used)
    host = GaugeMetricFamily("hmi_compute_host_cache_bytes", "adapters held in host memory (bytes), and the limit",
                             labels=["model", "kind"])
    host.add_metric([model, "used"], pool.host_bytes())
    host.add_metric([model, "limit"], pool.host_cache_bytes)
    yield from (hits, evictions, slots, host)
    if engine is None:
        return
    snapshot = engine.snapshot()
    kv = GaugeMetricFamily("hmi_compute_kv_cache_bytes", "paged KV pool: blocks held by running sequences, blocks "
                           "kept by the prefix cache for reuse (given up first), and the whole pool",
                           labels=["model", "kind"])
    kv.add_metric([model, "used"], snapshot.kv_bytes_used)
    kv.add_metric([model, "cached"], snapshot.kv_bytes_cached)
    kv.add_metric([model, "budget"], snapshot.kv_budget_bytes)
    kv.add_metric([model, "host_cached"], snapshot.kv_host_bytes_cached)
    kv.add_metric([model, "host_budget"], snapshot.kv_host_budget_bytes)
    swaps = CounterMetricFamily("hmi_compute_kv_host_blocks", "KV blocks the pool gave up into the host tier (out) "
                                "and copied back from it for a prefix hit (in)", labels=["model", "direction"])
    swaps.add_metric([model, "out"], snapshot.swapped_out)
    swaps.add_metric([model, "in"], snapshot.swapped_in)
    prefix = CounterMetricFamily("hmi_compute_prefix_cache_tokens", "prompt tokens looked up in the prefix cache, "
                                 "and those found (their prefill skipped): the hit rate is found / looked_up",
                                 labels=["model", "result"])
    prefix.add_metric([model, "looked_up"], snapshot.prefix_queries)
    prefix.add_metric([model, "found"], snapshot.prefix_hits)
    preempted = CounterMetricFamily("hmi_compute_generation_preemptions", "running sequences preempted for KV "
                                    "blocks (they recompute their tokens later)", labels=["model"])
    preempted.add_metric([model], snapshot.preemptions)
    sequences = GaugeMetricFamily("hmi_compute_generation_sequences", "generation requests running (in the batch) "
                                  "and waiting (for KV cache)", labels=["model", "state"])
    sequences.add_metric([model, "running"], snapshot.running)
    sequences.add_metric([model, "waiting"], snapshot.waiting)
    tokens = CounterMetricFamily("hmi_compute_generated_tokens", "tokens generated", labels=["model"])
    tokens.add_metric([model], snapshot.tokens_generated)
    steps = CounterMetricFamily("hmi_compute_generation_steps", "generation steps run", labels=["model"])
    steps.add_metric([model], snapshot.steps)
    yield from (kv, swaps, prefix, preempted, sequences, tokens, steps)
