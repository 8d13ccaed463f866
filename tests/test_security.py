"""Tenants that cannot touch each other, against real processes (the shared encoder + decoder deployment, auth on
by default as `hmi up` starts it): anonymous calls are refused on every method of both public services and the
HTTP door; a key scoped to `sec-acme-*` serves its tenants and is refused on every other one; read-only keys
only infer; revoked and expired keys stop at once; the store and compute refuse callers without the service
secret; quotas refuse before any work, naming the limit; the CLI creates, lists and revokes keys; and no secret
ever appears in a log or an error message."""
from __future__ import annotations

import http.client
import json
import re
import subprocess
import time

import grpc
import pytest
from google.protobuf import message_factory

from hmi.client import HMIClient
from hmi.launcher import hmi_command
from hmi_client.v1 import gateway_pb2
from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as store_grpc
from tests.helpers import cli_env, expect_status, internal_channel

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
SECRETS: list[str] = []          # every credential this module saw: none may appear in a log or an error
MESSAGES: list[str] = []         # every refusal's message


def refused(code: grpc.StatusCode, call, *args, **kwargs) -> str:
    message = expect_status(code, call, *args, **kwargs)
    MESSAGES.append(message)
    return message


@pytest.fixture(scope="module")
def tenants(front_door):
    """sec-acme-1 (classifier), sec-acme-gen (generator) and sec-other, in two domains; a tenant-admin key for
    sec-acme-* and an inference-only key for the same tenants."""
    SECRETS.extend([front_door.admin_token, front_door.service_secret])
    admin = front_door.client(timeout=60)
    admin.build_domain("sec-reviews", "the service was quick\nthe film was dull\nrain is expected tomorrow",
                       split_layer=1, context=2, min_count=1)
    admin.build_domain("sec-private", "", split_layer=0, context=1, min_count=1)
    admin.build_domain("sec-stories", "", split_layer=0, context=1, min_count=1, model="gen")
    admin.register_tenant("sec-acme-1", "sec-reviews", ["neg", "pos"], seed=1)
    admin.register_tenant("sec-acme-gen", "sec-stories", [], seed=2)
    admin.register_tenant("sec-other", "sec-private", ["neg", "pos"], seed=3)
    manager = admin.create_key(["sec-acme-*"], tenant_admin=True, description="acme's tenant admin")
    reader = admin.create_key(["sec-acme-*"], expires_in_days=1)
    SECRETS.extend([manager.secret, reader.secret])
    with front_door.client(timeout=60, token=manager.secret) as as_manager, \
            front_door.client(timeout=60, token=reader.secret) as as_reader:
        yield admin, as_manager, as_reader, manager, reader
    admin.close()


def unary_request(method) -> bytes:
    """A harmless request of the method's input type (empty, or naming a tenant for the data methods)."""
    cls = message_factory.GetMessageClass(method.input_type)
    message = cls()
    if "tenant_id" in cls.DESCRIPTOR.fields_by_name:
        message.tenant_id = "sec-acme-1"
    return message.SerializeToString()


def call_raw(channel, method, metadata=()) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    payload = unary_request(method)
    if method.client_streaming and method.server_streaming:
        list(channel.stream_stream(path)(iter([payload]), timeout=10, metadata=metadata))
    elif method.client_streaming:
        channel.stream_unary(path)(iter([payload]), timeout=10, metadata=metadata)
    elif method.server_streaming:
        list(channel.unary_stream(path)(payload, timeout=10, metadata=metadata))
    else:
        channel.unary_unary(path)(payload, timeout=10, metadata=metadata)


def test_anonymous_and_forged_calls_are_refused_on_every_method(front_door, tenants):
    every = [m for name in ("Gateway", "Admin") for m in gateway_pb2.DESCRIPTOR.services_by_name[name].methods]
    assert len(every) >= 20
    with grpc.insecure_channel(front_door.gateway_addr) as channel:
        for method in every:
            for metadata in ((), (("authorization", "Bearer not-a-key"),),
                             (("authorization", "Bearer hmi_k000000000000_" + "x" * 43),),
                             (("authorization", f"Basic {front_door.admin_token}"),)):
                message = refused(Code.UNAUTHENTICATED, call_raw, channel, method, metadata)
                assert "authorization" in message or "API key" in message or "credential" in message, message
        # Reflection is off on the public port: nobody can list the API.
        reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        refused(Code.UNIMPLEMENTED, lambda: list(reflect(iter([b"\x3a\x00"]), timeout=10)))
    routes = [("GET", "/v1/models", None), ("GET", "/v1/models/sec-acme-1", None),
              ("POST", "/v1/classify", {"model": "sec-acme-1", "input": "hi"}),
              ("POST", "/v1/embeddings", {"model": "sec-acme-1", "input": "hi"}),
              ("POST", "/v1/completions", {"model": "sec-acme-gen", "prompt": "hi"}),
              ("POST", "/v1/chat/completions", {"model": "sec-acme-gen", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})]
    for method, path, body in routes:
        for token in (None, "not-a-key"):
            status, reply, headers = http_call(front_door, method, path, body, token)
            assert status == 401 and reply["error"]["type"] == "authentication_error", (path, status, reply)
            assert headers.get("www-authenticate") == "Bearer"
            MESSAGES.append(reply["error"]["message"])
    assert http_call(front_door, "GET", "/health")[0] == 200 and http_call(front_door, "GET", "/ready")[0] == 200


def http_call(services, method: str, path: str, body: dict | None = None, token: str | None = None):
    connection = http.client.HTTPConnection(services.http_addr, timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        reply = connection.getresponse()
        data = reply.read().decode()
        return reply.status, json.loads(data), {k.lower(): v for k, v in reply.getheaders()}
    finally:
        connection.close()


def test_anonymous_clients_are_told_what_is_missing(front_door):
    with HMIClient(front_door.gateway_addr, timeout=10, token="") as anonymous:
        message = refused(Code.UNAUTHENTICATED, anonymous.list_tenants)
        assert "Bearer" in message and "hmi key create" in message


def test_a_scoped_key_serves_its_tenants_and_is_refused_on_others(front_door, tenants, tiny_model_dir, tmp_path):
    admin, manager, reader, _, reader_key = tenants
    for key in (manager, reader):          # inference on its own tenants
        assert key.classify("sec-acme-1", ["a fine film"])[0].label in ("neg", "pos")
        assert len(key.embed("sec-acme-1", ["a fine film"])[0]) == 64
        assert key.generate("sec-acme-gen", "the service was", max_new_tokens=3).collect().token_ids
        assert key.get_tenant("sec-acme-1").spec.domain == "sec-reviews"
        assert {t.spec.tenant_id for t in key.list_tenants().tenants} == {"sec-acme-1", "sec-acme-gen"}
        assert key.list_tenants().total == 2
        assert {d.spec.name for d in key.list_domains()} == {"sec-reviews", "sec-stories"}
        # Every other tenant is refused, whether it exists or not (nothing is revealed about it).
        for tenant in ("sec-other", "sec-nobody"):
            for call, args in ((key.classify, (tenant, ["hi"])), (key.embed, (tenant, ["hi"])),
                               (lambda t, k=key: k.generate(t, "hi", max_new_tokens=2).collect(), (tenant,)),
                               (key.get_tenant, (tenant,)), (key.delete_tenant, (tenant,)),
                               (key.get_adapter, (tenant,)), (key.get_tenant_limits, (tenant,)),
                               (key.register_tenant, (tenant, "sec-reviews", ["a", "b"]))):
                assert "outside this credential's scope" in refused(Code.PERMISSION_DENIED, call, *args)
        refused(Code.PERMISSION_DENIED, key.get_domain, "sec-private")
        refused(Code.PERMISSION_DENIED, key.lookup, "sec-private", [[101, 102]])
        for call, args, kwargs in ((key.build_domain, ("sec-x", ""), {"split_layer": 0, "context": 1, "min_count": 1}),
                           (key.delete_domain, ("sec-private",), {}), (key.create_key, (["*"],), {}),
                           (key.list_keys, (), {}), (key.revoke_key, (reader_key.key.id,), {}),
                           (key.set_tenant_limits, ("sec-acme-1",), {"rps": 1000}),
                           (key.backup, ("/tmp/never",), {})):
            assert "admin credential" in refused(Code.PERMISSION_DENIED, call, *args, **kwargs)
    # The inference-only key may not change or read out its tenants.
    for call, args in ((reader.register_tenant, ("sec-acme-2", "sec-reviews", ["a", "b"])),
                       (reader.delete_tenant, ("sec-acme-1",)), (reader.get_adapter, ("sec-acme-1",)),
                       (reader.lookup, ("sec-reviews", [[101, 102]]))):
        assert "--admin-of-tenants" in refused(Code.PERMISSION_DENIED, call, *args)
    # The tenant admin trains (PLOT lookups of its domain), registers, exports and deletes its own tenants, only
    # in its domains.
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": t, "label": label}) for t, label in
                               [("the film was great", "pos"), ("the film was dull", "neg")] * 4))
    from training.tenant_training import train_tenant
    report = train_tenant(manager, tiny_model_dir, "sec-reviews", train, None, None, epochs=1, batch_size=4)
    assert manager.register_tenant("sec-acme-2", "sec-reviews", report.labels, report.adapter).spec.tenant_id
    assert manager.get_adapter("sec-acme-2") and manager.classify("sec-acme-2", ["the film was great"])
    assert "hmi key create --domains" in refused(Code.PERMISSION_DENIED, manager.register_tenant, "sec-acme-3",
                                                 "sec-private", ["a", "b"])
    manager.delete_tenant("sec-acme-2")
    assert admin.get_tenant("sec-other").spec.tenant_id == "sec-other"     # untouched by all of the above
    # The HTTP door: the same scope, the same answers.
    token = reader_key.secret
    assert http_call(front_door, "POST", "/v1/classify", {"model": "sec-acme-1", "input": "hi"}, token)[0] == 200
    status, reply, _ = http_call(front_door, "POST", "/v1/classify", {"model": "sec-other", "input": "hi"}, token)
    assert status == 403 and reply["error"]["type"] == "permission_error"
    status, reply, _ = http_call(front_door, "POST", "/v1/chat/completions", {
        "model": "sec-other", "messages": [{"role": "user", "content": "hi"}]}, token)
    assert status == 403
    assert {m["id"] for m in http_call(front_door, "GET", "/v1/models", None, token)[1]["data"]} == {"sec-acme-1",
                                                                                                "sec-acme-gen"}


def test_revoked_and_expired_keys_stop_working_within_one_poll(front_door, tenants):
    admin = tenants[0]
    created = admin.create_key(["sec-acme-1"])
    short = admin.create_key(["sec-acme-1"], expires_in_days=3 / 86400)      # three seconds
    SECRETS.extend([created.secret, short.secret])
    with front_door.client(token=created.secret) as key, front_door.client(token=short.secret) as brief:
        assert key.classify("sec-acme-1", ["hi"]) and brief.classify("sec-acme-1", ["hi"])
        revoked_at = time.monotonic()
        assert admin.revoke_key(created.key.id).revoked_at > 0
        while True:        # the store answers once the gateway has read the revocation: refused at once
            try:
                key.classify("sec-acme-1", ["hi"])
            except grpc.RpcError as error:
                assert error.code() == Code.UNAUTHENTICATED and "revoked" in error.details()
                MESSAGES.append(error.details())
                break
            assert time.monotonic() - revoked_at < 0.5, "the revoked key still worked after a change-log poll"
        time.sleep(max(0.0, short.key.expires_at - time.time()) + 0.05)
        assert "expired" in refused(Code.UNAUTHENTICATED, brief.classify, "sec-acme-1", ["hi"])
    listed = {k.id: k for k in admin.list_keys()}
    assert listed[created.key.id].revoked_at and listed[short.key.id].expires_at


def test_the_store_and_compute_refuse_callers_without_the_service_secret(front_door, tenants):
    store, compute = front_door.store_addr, front_door.compute_addrs[0]
    for metadata in ((), (("hmi-service-secret", "a guess at the deployment's secret"),)):
        with grpc.insecure_channel(store) as channel:
            stub = store_grpc.KnowledgeStoreStub(channel)
            for call, request in ((stub.ListTenants, store_pb.ListTenantsRequest()),
                                  (stub.GetTenant, store_pb.GetTenantRequest(tenant_id="sec-other")),
                                  (stub.CreateKey, store_pb.CreateKeyRequest(tenants=["*"])),
                                  (stub.GetKeyVerifier, store_pb.GetKeyVerifierRequest(id=tenants[3].key.id)),
                                  (lambda r, s=stub, **kw: list(s.GetAdapter(r, **kw)),
                                   store_pb.GetAdapterRequest(tenant_id="sec-other"))):
                assert "internal" in refused(Code.UNAUTHENTICATED, call, request, timeout=10, metadata=metadata)
        with grpc.insecure_channel(compute) as channel:
            stub = compute_pb2_grpc.ComputeStub(channel)
            refused(Code.UNAUTHENTICATED, stub.Stats, compute_pb2.StatsRequest(), timeout=10, metadata=metadata)
            refused(Code.UNAUTHENTICATED, stub.Forward, compute_pb2.ForwardRequest(), timeout=10, metadata=metadata)
    from hmi.client import is_serving
    assert is_serving(store) and is_serving(compute)       # health checks need no secret
    with internal_channel(front_door, store) as channel:    # the services' own credentials pass
        assert store_grpc.KnowledgeStoreStub(channel).GetTenant(store_pb.GetTenantRequest(tenant_id="sec-other"),
                                                                timeout=10).spec.tenant_id == "sec-other"


def test_limits_refuse_before_any_work_naming_the_limit(front_door, tenants):
    admin, _, reader, _, reader_key = tenants
    admin.register_tenant("sec-acme-limited", "sec-reviews", ["neg", "pos"], seed=4)
    limits = admin.set_tenant_limits("sec-acme-limited", rps=2, max_concurrent=4)
    assert reader.get_tenant_limits("sec-acme-limited").rps == 2       # persisted in the store
    assert admin.get_tenant("sec-acme-limited").limits.max_concurrent == limits.max_concurrent == 4
    outcomes = []
    for _ in range(8):
        try:
            reader.classify("sec-acme-limited", ["hi"])
            outcomes.append("ok")
        except grpc.RpcError as error:
            assert error.code() == Code.RESOURCE_EXHAUSTED and "(rps)" in error.details()
            assert error.limit == "rps" and 0 < error.retry_after <= 1.0
            outcomes.append("refused")
            MESSAGES.append(error.details())
    assert outcomes.count("ok") in (2, 3) and outcomes.count("refused") >= 5, outcomes
    status, reply, headers = http_call(front_door, "POST", "/v1/classify", {"model": "sec-acme-limited", "input": "hi"},
                                  reader_key.secret)
    assert status == 429 and "rps" in reply["error"]["message"] and int(headers["retry-after"]) >= 1
    # Tokens per second: a request larger than what is left waits for the bucket; concurrency is capped.
    admin.set_tenant_limits("sec-acme-limited", tps=10)
    long_text = " ".join(["word"] * 30)
    reader.classify("sec-acme-limited", [long_text])                   # a full bucket lets a large one through
    assert "(tps)" in refused(Code.RESOURCE_EXHAUSTED, reader.classify, "sec-acme-limited", [long_text])
    admin.set_tenant_limits("sec-acme-gen", max_concurrent=1)
    stream = reader.generate("sec-acme-gen", "the service was", max_new_tokens=100)
    next(iter(stream))                                                 # one generation in flight
    try:
        assert "max_concurrent" in refused(Code.RESOURCE_EXHAUSTED,
                                           lambda: reader.generate("sec-acme-gen", "hi", max_new_tokens=2).collect())
    finally:
        stream.cancel()
    admin.set_tenant_limits("sec-acme-gen")                            # all 0: no limits
    deadline = time.monotonic() + 5
    while True:                                                        # the cancelled stream's slot comes back
        try:
            reader.generate("sec-acme-gen", "hi", max_new_tokens=2).collect()
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_keys_own_limits_hold_over_every_tenant_it_reaches(front_door, tenants):
    admin = tenants[0]
    admin.register_tenant("sec-acme-k1", "sec-reviews", ["neg", "pos"], seed=5)
    admin.register_tenant("sec-acme-k2", "sec-reviews", ["neg", "pos"], seed=6)
    created = admin.create_key(["sec-acme-k*"], rps=2, description="one customer's app")
    assert created.key.rps == 2 and admin.get_tenant_limits("sec-acme-k1").rps == 0   # the key's, not the tenants'
    outcomes = []
    with HMIClient(front_door.gateway_addr, timeout=30, token=created.secret, retries=0) as app:
        for index in range(8):
            try:
                app.classify(f"sec-acme-k{1 + index % 2}", ["hi"])     # both tenants, one key
                outcomes.append("ok")
            except grpc.RpcError as error:
                assert error.code() == Code.RESOURCE_EXHAUSTED and f"API key {created.key.id}" in error.details()
                assert error.limit == "rps"
                outcomes.append("refused")
    assert outcomes.count("ok") in (2, 3) and outcomes.count("refused") >= 5, outcomes
    admin.classify("sec-acme-k1", ["hi"])          # the admin is no key: the tenants themselves have no limit


def test_the_cli_creates_lists_and_revokes_keys(front_door, tenants):
    env = cli_env(front_door)       # the admin token from the data dir, as on the deployment's machine
    created = subprocess.run(hmi_command() + ["key", "create", "--tenants", "sec-acme-1,sec-acme-g*", "--expires", "2",
                                              "--description", "cli test", "--max-concurrent", "64"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    secret = lines[-1]
    SECRETS.append(secret)
    assert re.fullmatch(r"hmi_k[0-9a-f]{12}_\S+", secret) and "inference only" in lines[0]
    key_id = secret.split("_")[1]
    use = subprocess.run(hmi_command() + ["classify", "sec-acme-1", "a fine film"], env={**env, "HMI_TOKEN": secret},
                         capture_output=True, text=True, timeout=120)
    assert use.returncode == 0, use.stderr
    other = subprocess.run(hmi_command() + ["classify", "sec-other", "a fine film"], env={**env, "HMI_TOKEN": secret},
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 1 and "PERMISSION_DENIED" in other.stderr
    listed = subprocess.run(hmi_command() + ["key", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert key_id in listed.stdout and "cli test" in listed.stdout and secret not in listed.stdout
    assert "limits max_concurrent 64" in listed.stdout
    limits = subprocess.run(hmi_command() + ["tenant", "limits", "sec-acme-1", "--rps", "500", "--priority", "3"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert limits.returncode == 0 and "rps 500" in limits.stdout and "priority 3" in limits.stdout
    revoked = subprocess.run(hmi_command() + ["key", "revoke", key_id], env=env, capture_output=True, text=True,
                             timeout=120)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    again = subprocess.run(hmi_command() + ["classify", "sec-acme-1", "hi"], env={**env, "HMI_TOKEN": secret},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "UNAUTHENTICATED" in again.stderr and "revoked" in again.stderr
    MESSAGES.append(again.stderr)


def test_no_secret_appears_in_logs_or_error_messages(front_door, tenants):
    """Runs last: every log of the deployment so far, and every refusal's message, against every secret."""
    assert len(SECRETS) >= 6 and len(MESSAGES) > 50
    logs = "".join(path.read_text(errors="replace") for path in (front_door.data_dir / "logs").glob("*.log"))
    assert "refused" in logs or "key" in logs          # the logs were written
    for secret in SECRETS:
        random_part = secret.split("_", 2)[-1] if secret.startswith("hmi_") else secret
        assert random_part not in logs, "a secret was logged"
        assert not any(random_part in message for message in MESSAGES), "a secret was echoed in an error"
