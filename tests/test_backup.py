"""`hmi store backup` while writers run restores every write acknowledged before the backup began; request ids
make retried writes apply once; the client retries UNAVAILABLE."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from hmi.cli import main as hmi_main
from hmi.client import HMIClient
from services.knowledge_store.store import KnowledgeStore, StoreSettings
from tests.helpers import internal_channel

pytestmark = pytest.mark.integration


def test_backup_under_writes_restores_everything_acknowledged_before_it(services, client, tmp_path,
                                                                         tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HMI_TOKEN", services.admin_token)       # `hmi store backup` runs in this process
    client.build_domain("bk", "", split_layer=0, context=1, min_count=1)
    acknowledged: dict[str, int] = {}       # tenant -> version, once the store answered
    lock = threading.Lock()
    stop = threading.Event()

    def writer(index: int) -> None:
        with services.client(timeout=30) as own:
            count = 0
            while not stop.is_set():
                tenant = f"bk-{index}-{count}"
                version = own.register_tenant(tenant, "bk", ["a", "b"], rank=2).adapter_version
                with lock:
                    acknowledged[tenant] = version
                count += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        for mode, target in (("store", tmp_path / "via-store"), ("data-dir", tmp_path / "via-data-dir")):
            with lock:
                before = dict(acknowledged)
            args = ["store", "backup", str(target), "--gateway", services.gateway_addr]
            if mode == "data-dir":
                args += ["--data-dir", str(services.data_dir)]
            assert hmi_main(args) == 0, capsys.readouterr().err
            assert "backup of the store at revision" in capsys.readouterr().out
            time.sleep(0.5)                  # writers keep going meanwhile
            restored_dir = tmp_path / f"restored-{mode}"
            assert hmi_main(["store", "restore", str(target), "--data-dir", str(restored_dir)]) == 0
            assert hmi_main(["store", "restore", str(target), "--data-dir", str(restored_dir)]) == 2  # not twice
            store = KnowledgeStore(StoreSettings(data_dir=restored_dir, model_dir=tiny_model_dir,
                                                 model_name=tiny_model_dir.name, map_size=1 << 26))
            try:
                assert len(before) > 10
                missing = [t for t, v in before.items() if store.get_tenant(t).adapter_version != v]
                assert not missing, f"{mode}: acknowledged writes missing from the backup: {missing[:5]}"
                assert store.get_adapter(next(iter(before)))[1], "adapters are in the backup"
                assert store.layout.store_id != services_store_id(services)   # followers start over
                with store.layout.read() as txn:     # new versions never repeat one written after the backup
                    assert store.layout.revision(txn) > 2**32
            finally:
                store.close()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def services_store_id(services) -> str:
    from hmi_proto.v1 import knowledge_store_pb2 as pb
    from hmi_proto.v1 import knowledge_store_pb2_grpc as pb_grpc
    with internal_channel(services, services.store_addr) as ch:
        return pb_grpc.KnowledgeStoreStub(ch).ListChanges(pb.ListChangesRequest(limit=1), timeout=10).store_id


def test_a_retried_write_applies_once(client):
    client.build_domain("idem", "", split_layer=0, context=1, min_count=1)
    first = client.register_tenant("idem-t", "idem", ["a", "b"], request_id="retry-me")
    again = client.register_tenant("idem-t", "idem", ["a", "b"], request_id="retry-me")   # answer lost, retried
    assert again.adapter_version == first.adapter_version == client.get_tenant("idem-t").adapter_version
    client.delete_tenant("idem-t", request_id="delete-me")
    client.delete_tenant("idem-t", request_id="delete-me")       # OK, not NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        client.get_tenant("idem-t")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


class NotFound(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.NOT_FOUND


def test_client_retries_unavailable_with_backoff_within_the_timeout():
    with HMIClient("127.0.0.1:1", timeout=5, retries=4) as client:
        attempts = []

        def flaky(left):
            attempts.append(left)
            if len(attempts) < 3:
                raise Unavailable()
            return "answer"
        assert client._retrying(flaky) == "answer" and len(attempts) == 3
        assert attempts[1] < attempts[0]                 # each attempt gets what is left of the timeout

        def missing(left):
            attempts.append(left)
            raise NotFound()
        attempts.clear()
        with pytest.raises(NotFound):
            client._retrying(missing)
        assert len(attempts) == 1                         # only UNAVAILABLE is retried
        started = time.monotonic()
        with pytest.raises(Unavailable):
            client._retrying(lambda left: (_ for _ in ()).throw(Unavailable()), timeout=0.5)
        assert time.monotonic() - started < 0.6           # never past the timeout


def test_a_hot_copy_starts_again_when_the_running_store_grows_its_map(tmp_path, tiny_model_dir, monkeypatch):
    """`hmi store backup --data-dir` reads LMDB from another process: when the running store grows its map
    meanwhile, LMDB answers MDB_MAP_RESIZED and the copy adopts the new size and starts again."""
    import lmdb

    from services.knowledge_store import backup
    store = KnowledgeStore(StoreSettings(data_dir=tmp_path / "data", model_dir=tiny_model_dir,
                                         model_name=tiny_model_dir.name, map_size=1 << 26))
    try:
        store.build_domain("grow", "", split_layer=0, context=1, min_count=1)
        store.put_tenant("grower", "grow", ["a", "b"], rank=2)
    finally:
        store.close()
    opened = []

    class GrowingOnce:
        """The real environment, whose first copy meets a map the writer grew (as LMDB reports it)."""

        def __init__(self, env) -> None:
            self.env, self.copies, self.adopted = env, 0, False

        def copy(self, path, compact=False):
            self.copies += 1
            if self.copies == 1:
                with open(f"{path}/data.mdb", "wb") as partial:   # what an interrupted copy leaves behind
                    partial.write(b"partial")
                raise lmdb.MapResizedError("mdb_env_copy3: MDB_MAP_RESIZED")
            return self.env.copy(path, compact=compact)

        def set_mapsize(self, size):
            self.adopted = size == 0
            return self.env.set_mapsize(size)

        def __getattr__(self, name):
            return getattr(self.env, name)

    real_open = lmdb.open
    monkeypatch.setattr(backup.lmdb, "open", lambda *a, **k: opened.append(GrowingOnce(real_open(*a, **k)))
                        or opened[-1])
    report = backup.backup_data_dir(tmp_path / "data", tmp_path / "copy")
    assert opened[0].copies == 2 and opened[0].adopted
    restored = backup.restore(tmp_path / "copy", tmp_path / "restored")
    assert restored.revision == report.revision
    copy = KnowledgeStore(StoreSettings(data_dir=tmp_path / "restored", model_dir=tiny_model_dir,
                                        model_name=tiny_model_dir.name, map_size=1 << 26))
    try:
        assert copy.get_tenant("grower").labels == ["a", "b"]
    finally:
        copy.close()
