"""Peers going down and whole restarts: UNAVAILABLE within the deadline, nothing committed is lost."""
from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from tests.conftest import start_services
from tests.helpers import expect_status, retry_until_served

pytestmark = pytest.mark.integration
TEXTS = ["the service was quick", "I would like a refund", "sunny all weekend"]
COLD_TEXT = "weekend refund quick sunny like"   # words of the corpus in contexts it never had


@pytest.fixture
def own_services(tmp_path, tiny_model_dir):
    services = start_services(tmp_path / "data", tiny_model_dir)
    yield services
    services.stop()


def test_store_or_compute_down_gives_unavailable_within_deadline_then_recovers(own_services):
    with own_services.client() as client:
        client.build_domain("d", "\n".join(TEXTS), split_layer=2, context=2, min_count=1)
        client.register_tenant("t", "d", ["a", "b"], seed=3)
        before = client.classify("t", TEXTS)
        own_services.stop(["store"])
        # Texts whose PLOT rows compute has not cached need the store: UNAVAILABLE within the deadline.
        started = time.monotonic()
        message = expect_status(grpc.StatusCode.UNAVAILABLE, client.classify, "t", [COLD_TEXT], timeout=5)
        assert time.monotonic() - started < 5.5
        assert "unavailable" in message.lower() or "unreachable" in message.lower()
        own_services.start(only=["store"])
        after = retry_until_served(client.classify, "t", TEXTS)
        for old, new in zip(before, after):
            assert new.probabilities == pytest.approx(old.probabilities, abs=1e-6)

        own_services.stop(["compute"])
        expect_status(grpc.StatusCode.UNAVAILABLE, client.classify, "t", TEXTS, timeout=5)
        own_services.start(only=["compute"])
        again = retry_until_served(client.classify, "t", TEXTS)  # adapter fetched again by the new process
        for old, new in zip(before, again):
            assert new.probabilities == pytest.approx(old.probabilities, abs=1e-6)


def test_a_killed_store_spares_tenants_whose_rows_and_adapters_are_cached(own_services):
    """Under load: SIGKILL of the store; hot tenants keep being answered (the gateway's tenant records and API
    key verifiers, compute's adapters and PLOT rows), cold ones fail fast, and everything serves again after the
    restart."""
    with own_services.client() as admin:
        admin.build_domain("d", "\n".join(TEXTS), split_layer=2, context=2, min_count=1)
        for tenant in ("hot", "cold"):
            admin.register_tenant(tenant, "d", ["a", "b"], seed=3)
        key = admin.create_key(["hot", "cold"])     # the clients call with an API key (its verifier cached too)
    with own_services.client(token=key.secret) as client:
        expected = client.classify("hot", TEXTS)
        results = {"ok": 0, "failed": [], "wrong": 0}
        stop = threading.Event()

        def load():
            while not stop.is_set():
                try:
                    answer = client.classify("hot", TEXTS, timeout=5)
                except grpc.RpcError as error:
                    results["failed"].append(f"{error.code().name}: {error.details()}")
                    continue
                results["ok"] += 1
                if any(a.label != b.label for a, b in zip(answer, expected)):
                    results["wrong"] += 1
        threads = [threading.Thread(target=load) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        own_services.stop(["store"], sig=signal.SIGKILL)
        served_before = results["ok"]
        time.sleep(3.0)
        started = time.monotonic()
        expect_status(grpc.StatusCode.UNAVAILABLE, client.classify, "cold", TEXTS, timeout=5)
        assert time.monotonic() - started < 5.5
        during = results["ok"] - served_before
        own_services.start(only=["store"])
        cold = retry_until_served(client.classify, "cold", TEXTS)
        stop.set()
        for thread in threads:
            thread.join()
    assert not results["failed"], results["failed"][:3]
    assert results["wrong"] == 0 and during > 10
    assert [p.label for p in cold] == [p.label for p in expected]   # same seed, same adapter


def test_restart_loses_no_domain_tenant_or_adapter(own_services):
    with own_services.client() as client:
        client.build_domain("kept", "\n".join(TEXTS), split_layer=1, context=3, min_count=1)
        client.build_domain("kept-exact", "", split_layer=0, context=1, min_count=1)
        client.register_tenant("t1", "kept", ["a", "b", "c"])
        client.register_tenant("t2", "kept-exact", ["x", "y"])
        before = {t: client.classify(t, TEXTS) for t in ("t1", "t2")}
        embedded = client.embed("t1", TEXTS[:1])
    own_services.stop()
    own_services.start()
    with own_services.client() as client:
        assert {d.spec.name for d in client.list_domains()} == {"kept", "kept-exact"}
        assert client.list_tenants().total == 2
        for tenant, predictions in before.items():
            again = client.classify(tenant, TEXTS)
            assert [p.label for p in again] == [p.label for p in predictions]
            for old, new in zip(predictions, again):
                assert new.probabilities == pytest.approx(old.probabilities, abs=1e-6)
        assert client.embed("t1", TEXTS[:1])[0] == pytest.approx(embedded[0], abs=1e-6)


def test_killed_store_keeps_committed_writes(own_services):
    """SIGKILL right after a commit: LMDB has it on disk."""
    import signal
    with own_services.client() as client:
        client.build_domain("k", "", split_layer=0, context=1, min_count=1)
        client.register_tenant("survivor", "k", ["a", "b"], seed=9)
        version = client.get_tenant("survivor").adapter_version
    own_services.stop(["store"], sig=signal.SIGKILL)
    own_services.start(only=["store"])
    with own_services.client() as client:
        tenant = retry_until_served(client.get_tenant, "survivor")
        assert tenant.adapter_version == version
        assert client.classify("survivor", ["hello"])[0].label in ("a", "b")
