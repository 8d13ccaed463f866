"""The gateway's tenant directory follows the store's change log: cached until changed, never stale for long."""
from __future__ import annotations

import time

import grpc
import pytest

from hmi.launcher import ServiceSet, free_port
from hmi_proto.v1 import knowledge_store_pb2 as pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as pb_grpc
from services.common.errors import NotFound
from services.gateway.directory import LOOKUPS, TenantDirectory
from services.knowledge_store import layout as layout_module
from services.knowledge_store.layout import StoreLayout
from tests.helpers import internal_channel

TEXTS = ["the service was quick and friendly", "my order arrived broken", "a fine day at the beach"]


def lookups(result: str) -> float:
    return LOOKUPS.labels(result)._value.get()


def wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture(scope="module")
def store_stub(services, client):
    client.build_domain("dir", "\n".join(TEXTS), split_layer=1, context=2, min_count=1)
    with internal_channel(services, services.store_addr) as channel:
        yield pb_grpc.KnowledgeStoreStub(channel)


def test_records_are_cached_until_the_store_changes_them(store_stub, client):
    client.register_tenant("dir-a", "dir", ["yes", "no"], seed=1)
    directory = TenantDirectory(store_stub, ttl_seconds=0.0, poll_seconds=60.0)   # only the feed keeps records
    directory.sync()
    first = directory.resolve("dir-a", timeout=10)
    fetched, cached = lookups("fetched"), lookups("cached")
    for _ in range(5):
        assert directory.resolve("dir-a", timeout=10) == first
    assert (lookups("fetched"), lookups("cached")) == (fetched, cached + 5)

    client.register_tenant("dir-a", "dir", ["x", "y", "z"], seed=2)   # replaced elsewhere
    assert directory.resolve("dir-a", timeout=10) == first               # not polled yet: still cached
    assert directory.sync() == 1
    replaced = directory.resolve("dir-a", timeout=10)
    assert replaced.labels == ("x", "y", "z") and replaced.adapter_version > first.adapter_version

    client.delete_tenant("dir-a")
    directory.sync()
    with pytest.raises(NotFound) as error:          # the store's status, as the error logic above it raises
        directory.resolve("dir-a", timeout=10)
    assert error.value.code_name == "NOT_FOUND" and "dir-a" in str(error.value)


def test_records_expire_when_the_feed_is_not_followed(store_stub, client):
    client.register_tenant("dir-b", "dir", ["yes", "no"], seed=1)
    directory = TenantDirectory(store_stub, ttl_seconds=0.0, poll_seconds=0.05)
    directory.sync()
    directory.resolve("dir-b", timeout=10)
    time.sleep(0.3)        # four poll intervals without a sync: the feed counts as lost
    fetched = lookups("fetched")
    directory.resolve("dir-b", timeout=10)
    assert lookups("fetched") == fetched + 1


def test_a_rebuilt_domain_drops_its_tenants(store_stub, client):
    client.register_tenant("dir-c", "dir", ["yes", "no"], seed=1)
    directory = TenantDirectory(store_stub, ttl_seconds=0.0, poll_seconds=60.0)
    directory.sync()
    assert directory.resolve("dir-c", timeout=10).split_layer == 1
    client.build_domain("dir", "\n".join(TEXTS), split_layer=2, context=2, min_count=1)
    assert directory.sync() >= 2          # the domain and its tenant
    assert directory.resolve("dir-c", timeout=10).split_layer == 2
    client.build_domain("dir", "\n".join(TEXTS), split_layer=1, context=2, min_count=1)


def test_change_log_is_bounded_and_readers_left_behind_start_over(tmp_path, monkeypatch):
    monkeypatch.setattr(layout_module, "CHANGES_KEPT", 3)
    layout = StoreLayout(tmp_path / "lmdb", map_size=1 << 24)
    with layout.env.begin(write=True) as txn:
        for index in range(5):
            layout.record_change(txn, "tenant", f"t{index}")
    with layout.env.begin() as txn:
        assert layout.revision(txn) == 5
        assert layout.changes_after(txn, 2, limit=10) == ([(3, "tenant", "t2"), (4, "tenant", "t3"),
                                                           (5, "tenant", "t4")], True)
        assert layout.changes_after(txn, 3, limit=1) == ([(4, "tenant", "t3")], True)
        assert layout.changes_after(txn, 1, limit=10) == ([], False)        # revision 2 is gone
        assert sum(1 for _ in txn.cursor(db=layout.db["changes"])) == 3
    store_id = layout.store_id
    layout.close()
    assert StoreLayout(tmp_path / "lmdb", map_size=1 << 24).store_id == store_id   # kept across restarts
    assert StoreLayout(tmp_path / "other", map_size=1 << 24).store_id != store_id


def test_list_changes_rejects_a_negative_limit(store_stub):
    with pytest.raises(grpc.RpcError) as error:
        store_stub.ListChanges(pb.ListChangesRequest(after_revision=0, limit=-1), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_second_gateway_serves_changes_made_through_the_first(services, client, tmp_path):
    """Two real gateway processes: the second never expires records by time, only by the change log."""
    second = ServiceSet(data_dir=tmp_path, gateway_addr=f"127.0.0.1:{free_port()}", store_addr=services.store_addr,
                        compute_addrs=services.compute_addrs, model=services.model, log_dir=tmp_path / "logs",
                        extra_env={"HMI_TENANT_CACHE_TTL": "3600", "HMI_CHANGE_POLL_MS": "100",
                                   "HMI_TORCH_THREADS": "1",     # the first deployment's credentials, as variables
                                   "HMI_SERVICE_SECRET": services.service_secret,
                                   "HMI_ADMIN_TOKEN": services.admin_token})
    second.start(only=["gateway"], timeout=120)
    try:
        with second.client(timeout=60) as other:
            client.register_tenant("dir-d", "dir", ["yes", "no"], seed=1)
            assert other.classify("dir-d", [TEXTS[0]])[0].probabilities.keys() == {"yes", "no"}
            client.register_tenant("dir-d", "dir", ["x", "y", "z"], seed=2)
            assert wait_for(lambda: other.classify("dir-d", [TEXTS[0]])[0].probabilities.keys() == {"x", "y", "z"})
            client.delete_tenant("dir-d")

            def gone() -> bool:
                try:
                    other.classify("dir-d", [TEXTS[0]])
                    return False
                except grpc.RpcError as error:
                    return error.code() == grpc.StatusCode.NOT_FOUND
            assert wait_for(gone, timeout=10)
    finally:
        second.stop()


def test_preload_reads_every_record_in_pages_and_never_displaces_a_fetched_one(store_stub, client):
    for index in range(5):
        client.register_tenant(f"dir-p{index}", "dir", ["yes", "no"], seed=index)
    directory = TenantDirectory(store_stub, ttl_seconds=0.0, poll_seconds=60.0, max_entries=1_000_000)
    directory.sync()
    requested = directory.resolve("dir-p4", timeout=10)
    registered = client.list_tenants().total
    assert directory.preload(10_000, page=2) == registered - 1     # every other record, two at a time
    fetched, cached = lookups("fetched"), lookups("cached")
    assert directory.resolve("dir-p4", timeout=10) == requested
    assert directory.resolve("dir-p0", timeout=10).labels == ("yes", "no")
    assert (lookups("fetched"), lookups("cached")) == (fetched, cached + 2)
    assert next(reversed(directory._cache)) in ("dir-p4", "dir-p0")    # fetched and used ones: the warm end

    small = TenantDirectory(store_stub, ttl_seconds=0.0, poll_seconds=60.0, max_entries=3)
    small.sync()
    assert small.preload(10_000, page=2) == 3 and small.cached_tenants() == 3
    for index in range(5):
        client.delete_tenant(f"dir-p{index}")


def test_a_record_changed_anywhere_is_read_in_before_its_next_request(store_stub, client):
    directory = TenantDirectory(store_stub, ttl_seconds=0.0, poll_seconds=0.05, preload=1_000_000)
    directory.start()
    try:
        client.register_tenant("dir-r", "dir", ["yes", "no"], seed=1)
        assert wait_for(lambda: "dir-r" in directory._cache)
        fetched = lookups("fetched")
        assert directory.resolve("dir-r", timeout=10).labels == ("yes", "no")
        assert lookups("fetched") == fetched
        client.register_tenant("dir-r", "dir", ["x", "y", "z"], seed=2)      # replaced: read in again
        assert wait_for(lambda: "dir-r" in directory._cache and directory._cache["dir-r"][1].labels == ("x", "y", "z"))
        client.delete_tenant("dir-r")
        assert wait_for(lambda: "dir-r" not in directory._cache)
    finally:
        directory.close()


def test_listing_tenants_pages_through_every_record_with_the_total(store_stub, client):
    for index in range(3):
        client.register_tenant(f"dir-l{index}", "dir", ["yes", "no"], seed=index)
    for domain in ("", "dir"):
        everything = store_stub.ListTenants(pb.ListTenantsRequest(domain=domain), timeout=10)
        paged, after = [], ""
        while True:
            page = store_stub.ListTenants(pb.ListTenantsRequest(domain=domain, limit=2, after=after), timeout=10)
            assert page.total == everything.total == len(everything.tenants)
            if not page.tenants:
                break
            assert len(page.tenants) <= 2
            paged += [t.spec.tenant_id for t in page.tenants]
            after = paged[-1]
        assert paged == [t.spec.tenant_id for t in everything.tenants] and paged == sorted(paged)
        assert {f"dir-l{index}" for index in range(3)} <= set(paged)
    for index in range(3):
        client.delete_tenant(f"dir-l{index}")
