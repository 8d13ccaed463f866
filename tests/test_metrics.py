"""Prometheus metrics after a known sequence of calls (real services, read from each one's /metrics page): calls
by method and status code at the gateway and compute, per-tenant counts, tokens in and out, generation's time
to first token and inter-token latency, batches and adapter lookups at compute, and the store's LMDB map.

Counts are compared before and after the sequence: the services are shared with other tests, which never run
at the same time as this one."""
from __future__ import annotations

import json
import re
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hmi_client.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.integration
TEXTS = ["the service was quick", "I would like a refund"]


def scrape(url: str, token: str | None = None) -> dict[tuple[str, frozenset], float]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    samples: dict[tuple[str, frozenset], float] = defaultdict(float)
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, series), v in samples.items() if n == name and wanted <= series)


@pytest.fixture(scope="module")
def deployment(front_door):
    with front_door.client(timeout=60) as client:      # the admin's credential
        client.build_domain("metrics-d", "", split_layer=0, context=1, min_count=1)
        client.build_domain("metrics-stories", "", split_layer=0, context=1, min_count=1, model="gen")
        client.register_tenant("metrics-critic", "metrics-d", ["neg", "pos"], seed=7)
        client.register_tenant("metrics-embedder", "metrics-d", seed=8)
        client.register_tenant("metrics-bard", "metrics-stories", seed=9)
        client.classify("metrics-critic", TEXTS)           # warm: the adapter is loaded before counting
    return front_door


def pages(deployment) -> dict[str, dict]:
    """Every service's metrics port, and the gateway's HTTP /metrics (the admin's: the port leaves out the series
    that name tenants)."""
    found = {name: scrape(deployment.metrics_url(name)) for name in ("gateway", "compute", "compute-gen", "store")}
    found["gateway-admin"] = scrape(f"http://{deployment.http_addr}/metrics", deployment.admin_token)
    return found


def test_the_metrics_port_names_no_tenant(deployment):
    port, admin = pages(deployment)["gateway"], pages(deployment)["gateway-admin"]
    assert not any(name.startswith("hmi_gateway_tenant_requests") for name, _ in port)
    assert any(name.startswith("hmi_gateway_tenant_requests") for name, _ in admin)
    assert any(name.startswith("hmi_requests_total") for name, _ in port)


def test_counts_by_status_tokens_and_latency_after_a_known_sequence(deployment):
    before = pages(deployment)
    codes = []
    generated: list[int] = []
    messages_with_tokens = 0
    admin = (("authorization", f"Bearer {deployment.admin_token}"),)
    with grpc.insecure_channel(deployment.gateway_addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        calls = [("metrics-critic", TEXTS)] * 3 + [("metrics-nobody", TEXTS)] * 2 + [("metrics-embedder", TEXTS)] + \
            [("metrics-critic", [])]
        for tenant, texts in calls:
            try:
                stub.Classify(gateway_pb2.ClassifyRequest(tenant_id=tenant, texts=texts), timeout=30, metadata=admin)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
        for message in stub.Generate(gateway_pb2.GenerateTextRequest(tenant_id="metrics-bard",
                                                                     prompt="the service was", max_new_tokens=5),
                                     timeout=30, metadata=admin):
            generated += list(message.token_ids)
            messages_with_tokens += bool(message.token_ids)
    assert codes == ["OK"] * 3 + ["NOT_FOUND"] * 2 + ["FAILED_PRECONDITION", "INVALID_ARGUMENT"], codes
    assert generated, "the tiny decoder generated nothing"
    after = pages(deployment)

    def delta(page: str, name: str, **labels: str) -> float:
        return value(after[page], name, **labels) - value(before[page], name, **labels)

    gateway = {"service": "hmi.v1.Gateway", "method": "Classify"}
    assert delta("gateway", "hmi_requests_total", **gateway, code="OK") == 3
    assert delta("gateway", "hmi_requests_total", **gateway, code="NOT_FOUND") == 2
    assert delta("gateway", "hmi_requests_total", **gateway, code="FAILED_PRECONDITION") == 1
    assert delta("gateway", "hmi_requests_total", **gateway, code="INVALID_ARGUMENT") == 1
    assert delta("gateway", "hmi_requests_total", service="hmi.v1.Gateway", method="Generate", code="OK") == 1
    assert delta("gateway", "hmi_request_seconds_count", **gateway) == 7
    # Per tenant: the critic has a label of its own unless the busiest-tenant slots are taken (then `_other`).
    critic = sum(delta("gateway-admin", "hmi_gateway_tenant_requests_total", tenant=label, method="Classify",
                       code="OK") for label in ("metrics-critic", "_other"))
    assert critic == 3
    assert delta("gateway-admin", "hmi_gateway_tenant_requests_total", method="Classify", code="NOT_FOUND") == 2
    # Tokens and generation latency.
    assert delta("gateway", "hmi_gateway_tokens_total", model="gen", direction="out") == len(generated)
    assert delta("gateway", "hmi_gateway_tokens_total", model="gen", direction="in") > 0
    assert delta("gateway", "hmi_gateway_tokens_total", model="enc", direction="in") > 0
    assert delta("gateway", "hmi_gateway_time_to_first_token_seconds_count", model="gen") == 1
    assert delta("gateway", "hmi_gateway_inter_token_seconds_count", model="gen") == messages_with_tokens - 1
    assert value(after["gateway"], "hmi_gateway_queue_sequences", model="enc") == 0
    assert value(after["gateway"], "hmi_gateway_replicas", model="enc", state="ready") == 1
    # Compute: the three answered Classify calls ran as batches with the critic's adapter; the stream generated.
    assert delta("compute", "hmi_requests_total", service="hmi.v1.Compute", code="OK") >= 1
    assert delta("compute", "hmi_compute_batches_total") >= 1
    assert delta("compute", "hmi_compute_adapter_lookups_total") >= 1
    assert delta("compute-gen", "hmi_compute_generated_tokens_total", model="gen") >= len(generated)
    assert value(after["compute-gen"], "hmi_compute_kv_cache_bytes", kind="budget") > 0
    assert delta("compute-gen", "hmi_compute_prefix_cache_tokens_total", model="gen", result="looked_up") > 0
    # Store: the LMDB map holds what was registered, within its size.
    used = value(after["store"], "hmi_store_lmdb_bytes", kind="used")
    assert 0 < used <= value(after["store"], "hmi_store_lmdb_bytes", kind="map_size")


def exposed_names(url: str, token: str | None = None) -> set[str]:
    """Every series name a page can carry, children or not yet (a labelled counter before its first increment)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
    names = set()
    for family in text_string_to_metric_families(page):
        names |= {family.name, *(family.name + s for s in suffixes.get(family.type, ()))}
        names |= {sample.name for sample in family.samples}
    return names


def test_the_dashboard_and_the_alerts_use_only_metrics_the_services_export(deployment):
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    dashboard = json.loads((deploy / "grafana" / "hmi-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((deploy / "prometheus" / "alerts.yaml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    used = {name for expr in expressions for name in re.findall(r"\bhmi_[a-z_]+", expr)}
    exported = set().union(*(exposed_names(deployment.metrics_url(name))
                             for name in ("gateway", "compute", "compute-gen", "store")))
    # The per-tenant series: on the admin's HTTP /metrics, and on the port with --metrics-tenant-labels.
    exported |= exposed_names(f"http://{deployment.http_addr}/metrics", deployment.admin_token)
    assert len(used) > 20 and used <= exported, f"not exported by any service: {sorted(used - exported)}"
