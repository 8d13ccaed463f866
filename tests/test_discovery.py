"""Replica discovery: every address behind one name is a replica of its own (affinity, in-flight limit,
health), replicas that come and go are noticed; and a request can be followed across the services (request
ids in JSON logs, OpenTelemetry spans in one trace).

The integration tests start real processes: a store, compute replicas on 127.0.0.2, .3, .4 (and later .5) all on
one port, and a gateway that finds them through a DNS server of the test's own on loopback
(`--compute dns://127.0.0.1:PORT/computes.hmi.test:PORT`), as a gateway finds pods behind a headless Service.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from hmi.client import HMIClient, is_serving
from hmi.launcher import free_port, hmi_command
from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from services.common.auth.peers import PeerSecurity
from services.common.discovery import Discovery, ResolverUnavailable, dns_server_resolver, parse_target
from services.gateway.router import Router, _score
from tests.dns_server import LoopbackDns

NAME = "computes.hmi.test"
SERVICE_SECRET = "discovery-test-service-secret-0123456789"   # the services' credentials, given as variables
ADMIN_TOKEN = "discovery-test-admin-token-0123456789"
TEXTS = ["the service was quick", "I would like a refund"]


# ---- units ------------------------------------------------------------------------------------

def test_targets_parse_as_grpc_spells_them():
    assert parse_target("compute:50053") == parse_target("compute:50053")
    plain = parse_target("dns:///compute:50053")
    assert (plain.host, plain.port, plain.dns_server) == ("compute", 50053, None)
    server = parse_target("dns://10.0.0.10:5353/compute.hmi.svc:50053")
    assert (server.host, server.port, server.dns_server) == ("compute.hmi.svc", 50053, ("10.0.0.10", 5353))
    assert parse_target("dns://10.0.0.10/c:1").dns_server == ("10.0.0.10", 53)
    assert parse_target("[::1]:50053").host == "::1" and parse_target("[::1]:50053").is_address
    assert parse_target("ipv4:127.0.0.1:7").is_address
    for bad in ("compute", "compute:0", "compute:http", ":50053"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_a_dns_server_name_resolves_to_every_address_and_an_unknown_name_to_none():
    server = LoopbackDns()
    try:
        server.records[NAME] = ["127.0.0.3", "127.0.0.2"]
        assert dns_server_resolver(parse_target(server.target(NAME, 7000))) == ["127.0.0.2:7000", "127.0.0.3:7000"]
        assert dns_server_resolver(parse_target(server.target("nobody.hmi.test", 7000))) == []
    finally:
        server.close()


def test_discovery_keeps_what_it_knew_while_the_resolver_does_not_answer():
    answers: list = [["10.0.0.1:1", "10.0.0.2:1"], ResolverUnavailable("timeout"), ["10.0.0.2:1"]]

    def resolver(_target):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    discovery = Discovery(["compute:1"], resolver, interval=60, min_interval=0)
    assert discovery.resolve() == ["10.0.0.1:1", "10.0.0.2:1"]
    assert discovery.resolve() == ["10.0.0.1:1", "10.0.0.2:1"], "a DNS outage removes nothing"
    assert discovery.resolve() == ["10.0.0.2:1"]
    assert not discovery.due()
    discovery.request()
    assert discovery.due(), "a failed replica asks for a resolution soon"


def test_router_follows_membership_homes_move_only_for_joining_and_leaving_replicas():
    members = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
    router = Router(["compute:1"], resolver=lambda _t: list(members), inflight_per_replica=1)
    tenants = [f"tenant-{i}" for i in range(60)]
    homes = {t: router.home_address(t) for t in tenants}
    assert set(homes.values()) == set(members)
    members.append("10.0.0.4:1")
    router._apply(router.discovery.resolve(), probed=False)
    moved = {t for t in tenants if router.home_address(t) != homes[t]}
    assert moved and all(router.home_address(t) == "10.0.0.4:1" for t in moved), "only tenants of the new replica move"
    busy = router.acquire([tenants[0]])              # a batch in flight on a replica that then leaves
    members[:] = [m for m in members if m != busy.address]
    router._apply(router.discovery.resolve(), probed=False)
    assert busy.address not in [r.address for r in router.replicas]
    assert all(router.acquire([t]).address != busy.address for t in tenants[:3]), "no new work for a leaving one"
    assert busy.address in [a for a, *_ in router.snapshot()], "kept until its batch answers"
    router.release(busy)
    assert busy.address not in [a for a, *_ in router.snapshot()]


# ---- real processes behind one name -----------------------------------------------------------

def shared_port(hosts: list[str]) -> int:
    """A port free on every one of the loopback addresses."""
    while True:
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as sock:
                    sock.bind((host, port))
            return port
        except OSError:
            continue


class Cluster:
    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.model = model
        self.dns = LoopbackDns()
        self.port = shared_port([f"127.0.0.{i}" for i in range(2, 6)])
        self.store_addr = f"127.0.0.1:{free_port()}"
        self.gateway_addr = f"127.0.0.1:{free_port()}"
        self.spans = root / "spans.jsonl"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {"HMI_TORCH_THREADS": "1", "HMI_MAX_WAIT_MS": "2", "HMI_LOG_FORMAT": "json",
                    "HMI_LOG_LEVEL": "DEBUG", "HMI_TRACING": f"file:{self.spans}", "HMI_MODEL_CACHE": str(root),
                    "HMI_SERVICE_SECRET": SERVICE_SECRET, "HMI_ADMIN_TOKEN": ADMIN_TOKEN}

    def spawn(self, name: str, args: list[str]) -> None:
        import os
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(hmi_command() + ["serve"] + args, stdout=log, stderr=log,
                                                env={**os.environ, **self.env})

    def compute(self, host: str) -> None:
        self.spawn(host, ["compute", "--listen", f"{host}:{self.port}", "--store", self.store_addr,
                          "--model", str(self.model)])

    def wait(self, address: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not is_serving(address, timeout=0.5):
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            assert not dead, f"{dead} exited; see {self.root}"
            assert time.monotonic() < deadline, f"{address} did not become SERVING"
            time.sleep(0.2)

    def batches(self, host: str) -> int:
        from services.common.rpc import channel as service_channel
        with service_channel(f"{host}:{self.port}", security=PeerSecurity(service_secret=SERVICE_SECRET)) as channel:
            return compute_pb2_grpc.ComputeStub(channel).Stats(compute_pb2.StatsRequest(), timeout=10).batches

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
        self.dns.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("discovery")
    cluster = Cluster(root, tiny_model_dir)
    first = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    cluster.dns.records[NAME] = list(first)
    try:
        cluster.spawn("store", ["store", "--listen", cluster.store_addr, "--data-dir", str(root / "data"),
                                "--model", str(tiny_model_dir)])
        for host in first:
            cluster.compute(host)
        cluster.spawn("gateway", ["gateway", "--listen", cluster.gateway_addr, "--http", "off",
                                  "--store", cluster.store_addr, "--model", str(tiny_model_dir),
                                  "--compute", cluster.dns.target(NAME, cluster.port),
                                  "--discovery-interval", "0.5", "--probe-interval", "0.25"])
        cluster.wait(cluster.gateway_addr)
        with HMIClient(cluster.gateway_addr, token=ADMIN_TOKEN, timeout=60) as client:
            client.build_domain("d", "\n".join(TEXTS * 3), split_layer=1, context=2, min_count=1)
            cluster.tenants = choose_tenants(first, "127.0.0.5", cluster.port)
            for tenant in cluster.tenants:
                client.register_tenant(tenant, "d", ["a", "b"], seed=1)
        yield cluster
    finally:
        cluster.stop()


def home(tenant: str, hosts: list[str], port: int) -> str:
    return max(hosts, key=lambda h: _score(tenant, f"{h}:{port}"))


def choose_tenants(first: list[str], later: str, port: int, count: int = 16) -> list[str]:
    """Tenant names whose homes cover every first replica and move some to the later one.

    Homes hash the replica's address, and the port is free-picked per run, so a fixed list of names
    sometimes leaves a replica without a tenant; picking by hash keeps the tests about routing, not luck.
    """
    names = [f"tenant-{i}" for i in range(1000)]
    chosen: list[str] = []
    for host in first:
        chosen += [t for t in names if t not in chosen and home(t, first, port) == host][:3]
    chosen += [t for t in names if t not in chosen and home(t, first + [later], port) == later][:3]
    chosen += [t for t in names if t not in chosen][:count - len(chosen)]
    return chosen


def test_three_replicas_behind_one_name_receive_affinity_routed_batches(cluster):
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    expected = {h: 0 for h in hosts}
    for tenant in cluster.tenants:
        expected[home(tenant, hosts, cluster.port)] += 1
    assert all(expected.values()), "the tenants chosen have homes on every replica"
    before = {h: cluster.batches(h) for h in hosts}
    with HMIClient(cluster.gateway_addr, token=ADMIN_TOKEN, timeout=30) as client:
        for tenant in cluster.tenants:              # one request at a time: one batch each, at its home
            assert client.classify(tenant, TEXTS[:1])[0].label in ("a", "b")
    received = {h: cluster.batches(h) - before[h] for h in hosts}
    assert received == expected, f"batches per replica {received}, the tenants' homes say {expected}"


def test_a_replica_added_later_receives_work(cluster):
    cluster.compute("127.0.0.5")
    cluster.wait(f"127.0.0.5:{cluster.port}")
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    cluster.dns.records[NAME] = list(hosts)
    movers = [t for t in cluster.tenants if home(t, hosts, cluster.port) == "127.0.0.5"]
    assert movers
    deadline = time.monotonic() + 30
    with HMIClient(cluster.gateway_addr, token=ADMIN_TOKEN, timeout=30) as client:
        while cluster.batches("127.0.0.5") == 0:
            assert time.monotonic() < deadline, "the new replica never received a batch"
            for tenant in movers:
                client.classify(tenant, TEXTS[:1])
            time.sleep(0.2)
        stayer = next(t for t in cluster.tenants if t not in movers)
        stayer_home = home(stayer, hosts, cluster.port)
        before = cluster.batches(stayer_home)
        client.classify(stayer, TEXTS[:1])
        assert cluster.batches(stayer_home) == before + 1, "a tenant whose home stayed is still served there"


def test_a_replica_removed_stops_receiving_work_without_failed_requests(cluster):
    leaving = "127.0.0.3"
    cluster.dns.records[NAME] = ["127.0.0.2", "127.0.0.4", "127.0.0.5"]
    time.sleep(1.5)                                 # discovery every 0.5 s
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def client_loop(offset: int) -> None:
        with HMIClient(cluster.gateway_addr, token=ADMIN_TOKEN, timeout=30, retries=0) as client:
            i = offset
            while not stop.is_set():
                try:
                    client.classify(cluster.tenants[i % len(cluster.tenants)], TEXTS[:1])
                    answered[0] += 1
                except grpc.RpcError as error:
                    failures.append(f"{error.code().name}: {error.details()}")
                i += 1

    threads = [threading.Thread(target=client_loop, args=(k * 5,)) for k in range(3)]
    before = cluster.batches(leaving)
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    during = cluster.batches(leaving)
    cluster.processes[leaving].send_signal(signal.SIGTERM)   # it drains and exits; nobody sends it work
    time.sleep(1.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures[:5]
    assert answered[0] > 10
    assert during == before, "the replica that left discovery received batches"
    assert cluster.processes[leaving].wait(timeout=20) == 0


def test_a_request_is_followed_through_gateway_compute_and_store(cluster):
    """One request id in every service's JSON log, and one trace with spans of all three services."""
    request_id = "follow-me-0042"
    with grpc.insecure_channel(cluster.gateway_addr) as channel:
        from hmi_client.v1 import gateway_pb2, gateway_pb2_grpc
        reply = gateway_pb2_grpc.GatewayStub(channel).Classify(
            gateway_pb2.ClassifyRequest(tenant_id=cluster.tenants[0], texts=["a text nobody sent before"]),
            timeout=30, metadata=[("x-request-id", request_id), ("authorization", f"Bearer {ADMIN_TOKEN}")])
    assert reply.results[0].label in ("a", "b")
    deadline = time.monotonic() + 10
    while True:
        spans = [json.loads(line) for line in cluster.spans.read_text().splitlines() if line.strip()]
        root = [s for s in spans if s["name"] == "hmi.v1.Gateway/Classify"
                and s["attributes"].get("hmi.request_id") == request_id]
        trace = root[0]["context"]["trace_id"] if root else None
        services = {s["resource"]["attributes"]["service.name"] for s in spans if s["context"]["trace_id"] == trace}
        if {"hmi-gateway", "hmi-compute", "hmi-store"} <= services or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert root, "the gateway's span carries the request id"
    assert {"hmi-gateway", "hmi-compute", "hmi-store"} <= services, f"one trace spans {services}"
    names = {s["name"] for s in spans if s["context"]["trace_id"] == trace}
    assert {"hmi.v1.Compute/Forward", "hmi.v1.KnowledgeStore/Lookup"} <= names
    for service in ("gateway", "127.0.0.2", "store"):
        lines = [json.loads(line) for line in (cluster.root / f"{service}.log").read_text().splitlines()
                 if line.startswith("{")]
        assert lines, f"{service} logs JSON"
        assert all({"time", "level", "service", "message"} <= set(line) for line in lines)
    tagged = {service: [line for line in (cluster.root / f"{service}.log").read_text().splitlines()
                        if line.startswith("{") and request_id in json.loads(line).get("request_id", "")]
              for service in ("gateway", "store")}
    assert all(tagged.values()), f"the request id in the logs of {[k for k, v in tagged.items() if not v]} is missing"
