"""Long store jobs stop when their caller goes away or the store is asked to stop; every service exits
within a bounded drain time after SIGTERM."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest

from hmi.client import HMIClient
from hmi_proto.v1 import knowledge_store_pb2 as store_pb
from hmi_proto.v1 import knowledge_store_pb2_grpc as store_grpc
from services.common.codec import split_chunks
from services.common.rpc import channel
from tests.conftest import start_services

pytestmark = pytest.mark.integration
CORPUS = (Path(__file__).resolve().parent.parent / "data" / "demo_corpus.txt").read_text(encoding="utf-8")
DRAIN_LIMIT = 16.0         # services exit at most 15 s after SIGTERM (services/common/server.py)


def long_adaptation(client: HMIClient, name: str):
    """An AdaptDomain of 5,000 steps (about a minute here); returns the progress stream."""
    def requests():
        yield store_pb.AdaptDomainRequest(spec=store_pb.DomainSpec(name=name, split_layer=1))
        yield store_pb.AdaptDomainRequest(settings=store_pb.AdaptSettings(steps=5000, batch_size=16))
        for chunk in split_chunks(CORPUS.encode()):
            yield store_pb.AdaptDomainRequest(corpus_chunk=chunk)
    return client.admin.AdaptDomain(requests(), timeout=600)


def first_progress(stream) -> None:
    for update in stream:
        if update.stage == "adapting":
            return


def test_jobs_stop_when_the_caller_leaves_or_the_store_stops(tmp_path, tiny_model_dir):
    services = start_services(tmp_path / "data", tiny_model_dir)
    try:
        with services.client(timeout=60, retries=0) as client:
            stream = long_adaptation(client, "abandoned")
            first_progress(stream)
            stream.cancel()                     # the client goes away after the first progress message
            started = time.monotonic()          # the next build gets the build lock at once
            client.build_domain("after", "a short corpus\nof two lines", split_layer=1, context=1, min_count=1)
            assert time.monotonic() - started < 20
            with pytest.raises(grpc.RpcError) as error:
                client.get_domain("abandoned")   # the cancelled job wrote nothing
            assert error.value.code() == grpc.StatusCode.NOT_FOUND

            stream = long_adaptation(client, "interrupted")
            first_progress(stream)
            for name in ("store", "gateway", "compute"):
                process = next(s.process for s in services.services if s.name == name)
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=DRAIN_LIMIT + 5)
                assert time.monotonic() - started < DRAIN_LIMIT, f"{name} took too long to stop"
        services.start(only=["store"])          # the interrupted adaptation left nothing behind
        stub = store_grpc.KnowledgeStoreStub(channel(services.store_addr, security=services.peer_security()))
        names = {d.spec.name for d in stub.ListDomains(store_pb.ListDomainsRequest(), timeout=30).domains}
        assert names == {"after"}
    finally:
        services.stop()
