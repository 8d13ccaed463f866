"""TLS end to end with certificates made at test time (openssl): every service serves TLS, the store and compute
require client certificates their CA signed (mutual TLS) besides the service secret, the gateway's gRPC and
HTTPS doors serve clients that trust the CA, and a plaintext client (or one that does not trust the CA) is
refused. The metrics port binds to the interface gRPC listens on, and no secret shows in metrics or logs."""
from __future__ import annotations

import json
import shutil
import ssl
import time
import urllib.error
import urllib.request

import grpc
import pytest

from hmi.client import HMIClient
from hmi.launcher import ServiceSet, free_port
from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as store_grpc
from services.common.auth.peers import PeerSecurity
from services.common.rpc import channel
from services.common.server import start_server
from services.gateway.router import Router
from tests.helpers import expect_status, make_certificates

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates")]
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def secured(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("tls")
    tls = make_certificates(folder / "certs")
    services = ServiceSet.on_free_ports(folder / "data", model=str(tiny_model_dir), log_dir=folder / "logs", tls=tls,
                                        extra_env={"HMI_TORCH_THREADS": "1", "HMI_MAX_WAIT_MS": "5"})
    metrics_port = services.metrics_ports["gateway"]       # every service gets one (--metrics-port)
    services.start(timeout=180)
    with services.client(timeout=60) as admin:
        admin.build_domain("tls", "", split_layer=0, context=1, min_count=1)
        admin.register_tenant("tls-t", "tls", ["neg", "pos"], seed=1)
        yield services, admin, metrics_port, folder
    services.stop()


def test_clients_that_trust_the_ca_are_served_over_grpc_and_https(secured):
    services, admin, _, _ = secured
    assert admin.classify("tls-t", ["a fine film"])[0].label in ("neg", "pos")
    context = ssl.create_default_context(cafile=str(services.tls.ca))
    request = urllib.request.Request(f"https://{services.http_addr}/v1/classify", method="POST",
                                     data=json.dumps({"model": "tls-t", "input": "a fine film"}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {services.admin_token}"})
    with urllib.request.urlopen(request, context=context, timeout=30) as reply:
        assert reply.status == 200 and json.loads(reply.read())["data"][0]["label"] in ("neg", "pos")


def test_plaintext_and_untrusting_clients_are_refused(secured):
    services, _, _, _ = secured
    with HMIClient(services.gateway_addr, timeout=5, retries=0, token=services.admin_token, tls_ca="") as plain:
        expect_status(Code.UNAVAILABLE, plain.classify, "tls-t", ["hi"])
    with HMIClient(services.gateway_addr, timeout=5, retries=0, token=services.admin_token, tls_ca="",
                   tls=True) as system_roots:         # TLS, but the system's CAs do not know the deployment's
        expect_status(Code.UNAVAILABLE, system_roots.classify, "tls-t", ["hi"])
    with pytest.raises((urllib.error.URLError, ConnectionError, http_errors())):
        urllib.request.urlopen(f"http://{services.http_addr}/health", timeout=10)    # plain HTTP to HTTPS


def http_errors():
    import http.client
    return http.client.HTTPException


def test_internal_services_require_a_client_certificate_and_the_secret(secured, tmp_path):
    services, _, _, _ = secured
    tls = services.tls
    stranger = make_certificates(tmp_path / "stranger", "stranger")     # a certificate another CA signed
    refusals = {
        "no client certificate": PeerSecurity(service_secret=services.service_secret, tls_ca=str(tls.ca)),
        "another CA's certificate": PeerSecurity(service_secret=services.service_secret, tls_ca=str(tls.ca),
                                                 tls_cert=str(stranger.cert), tls_key=str(stranger.key)),
        "plaintext": PeerSecurity(service_secret=services.service_secret),
    }
    for address, call in ((services.store_addr, lambda ch: store_grpc.KnowledgeStoreStub(ch).ListTenants(
            store_pb.ListTenantsRequest(), timeout=5)),
                          (services.compute_addrs[0], lambda ch: compute_pb2_grpc.ComputeStub(ch).Stats(
                              compute_pb2.StatsRequest(), timeout=5))):
        for why, security in refusals.items():
            with channel(address, security=security) as refused:
                with pytest.raises(grpc.RpcError) as caught:
                    call(refused)
                assert caught.value.code() == Code.UNAVAILABLE, why
        without_secret = PeerSecurity(tls_ca=str(tls.ca), tls_cert=str(tls.cert), tls_key=str(tls.key))
        with channel(address, security=without_secret) as certified:
            assert "service secret" in expect_status(Code.UNAUTHENTICATED, call, certified)
        with channel(address, security=services.peer_security()) as peer:
            assert call(peer) is not None


def test_discovered_replicas_are_reached_over_mutual_tls_checked_against_their_name_with_the_secret(tmp_path):
    """The router resolves a name to addresses and connects to each address, yet verifies the replica's
    certificate against the name (a certificate names services, not pod addresses); its probes and calls carry
    the client certificate and the service secret. (A TLS server with health and one method; no models.)"""
    tls = make_certificates(tmp_path / "certs", names="DNS:localhost")        # no IP address in the certificate
    security = PeerSecurity(service_secret="router-test-service-secret-0123", tls_cert=str(tls.cert),
                            tls_key=str(tls.key), tls_ca=str(tls.ca))
    ping = grpc.method_handlers_generic_handler("test.Echo", {
        "Ping": grpc.unary_unary_rpc_method_handler(lambda request, context: b"pong")})
    port = free_port()
    running = start_server(f"127.0.0.1:{port}", lambda server: server.add_generic_rpc_handlers((ping,)),
                           ["hmi.v1.Compute"], workers=2, security=security, internal=True)
    running.set_serving(True)
    routers = {target: Router([target], security=security, probe_interval=0.5)
               for target in (f"localhost:{port}", f"127.0.0.1:{port}")}
    try:
        for router in routers.values():
            router.start()
        by_name, by_address = routers[f"localhost:{port}"], routers[f"127.0.0.1:{port}"]
        assert [r.address for r in by_name.replicas] == [f"127.0.0.1:{port}"], "the name resolved to an address"
        deadline = time.monotonic() + 20                 # probes every 0.5 s; a loaded machine may miss one
        while not by_name.usable_count() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert by_name.usable_count() == 1, "the probe over mutual TLS, checked against the name, succeeded"
        assert by_name.replicas[0].channel.unary_unary("/test.Echo/Ping")(b"", timeout=5) == b"pong", \
            "calls carry the service secret"
        assert by_address.usable_count() == 0, "an address the certificate does not name is not trusted"
    finally:
        for router in routers.values():
            router.close()
        running.server.stop(0)


def test_metrics_bind_to_the_grpc_interface_and_no_secret_leaks(secured):
    services, admin, metrics_port, folder = secured
    bound = [line.split()[1] for path in ("/proc/net/tcp", "/proc/net/tcp6") for line in open(path).readlines()[1:]
             if line.split()[1].endswith(f":{metrics_port:04X}") and line.split()[3] == "0A"]       # listening
    assert bound and all(address.startswith("0100007F") for address in bound), bound    # 127.0.0.1 only
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert "hmi_requests_total" in metrics and "hmi_gateway_tenant_requests_total" not in metrics   # no tenant names
    key = admin.create_key(["tls-t"])
    with services.client(token=key.secret) as scoped:
        scoped.classify("tls-t", ["hi"])
        expect_status(Code.PERMISSION_DENIED, scoped.classify, "other", ["hi"])
    logs = "".join(p.read_text(errors="replace") for p in (folder / "logs").glob("*.log"))
    assert "mutual TLS" in logs
    for secret in (services.admin_token, services.service_secret, key.secret.split("_", 2)[-1]):
        assert secret not in metrics and secret not in logs
