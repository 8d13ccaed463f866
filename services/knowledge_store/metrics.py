"""The store's Prometheus metrics: lookups, rows and bytes streamed (counted by the servicer), and the LMDB
map's use read when scraped (what `--map-size-gib` / `--max-map-size-gib` bound), and fine-tuning jobs by
status."""
from __future__ import annotations

from typing import Iterator

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

LOOKUPS = Counter("hmi_store_lookups_total", "PLOT lookups answered")
LOOKUP_TOKENS = Counter("hmi_store_lookup_tokens_total", "tokens whose layer-L rows lookups returned")
BYTES_STREAMED = Counter("hmi_store_bytes_streamed_total", "payload bytes streamed to callers", ["method"])


def store_state(store) -> Iterator:
    layout = store.layout
    lmdb_map = GaugeMetricFamily("hmi_store_lmdb_bytes", "the LMDB map: bytes in use, the current map size "
                                 "(grown by doubling) and its ceiling (--max-map-size-gib)", labels=["kind"])
    lmdb_map.add_metric(["used"], layout.used_bytes())
    lmdb_map.add_metric(["map_size"], layout.map_size)
    lmdb_map.add_metric(["max_map_size"], layout.max_map_size)
    yield lmdb_map
    jobs = GaugeMetricFamily("hmi_store_fine_tuning_jobs", "fine-tuning jobs by status", labels=["status"])
    for status, count in store.job_counts().items():
        jobs.add_metric([status], count)
    yield jobs
