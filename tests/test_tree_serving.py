"""Domains as a user runs them through the CLI and the services: adapt, build, child domains, and a tree
that learns from the traffic the gateway sends (shown by `hmi domain show`)."""
from __future__ import annotations

import json
import re
import time

import pytest

from tests.test_cli import hmi

pytestmark = pytest.mark.integration
CLINIC = ["the patient was given aspirin for the pain", "the patient was given insulin for diabetes",
          "the doctor gave the patient aspirin", "the nurse gave the patient insulin"]
NOVEL = "a nurse measured the blood pressure of an elderly patient"


def test_adapt_build_and_learn_from_traffic(services, client, tmp_path):
    corpus = tmp_path / "clinic.txt"
    corpus.write_text("\n".join(CLINIC * 5))
    out = hmi(services, "domain", "adapt", "clinic", "--corpus", str(corpus), "--split-layer", "2",
              "--steps", "6", "--batch-size", "4").stdout
    assert "adapted in 6 steps" in out and "hmi domain build clinic" in out
    out = hmi(services, "domain", "build", "clinic", "--corpus", str(corpus), "--split-layer", "2", "--context", "3",
              "--min-count", "1", "--learn-threshold", "2").stdout
    assert "adapted lower model" in out

    hmi(services, "tenant", "register", "nurse-bot", "--domain", "clinic", "--labels", "routine,urgent")
    first = client.classify("nurse-bot", [NOVEL])[0].probabilities
    client.classify("nurse-bot", [NOVEL, NOVEL])
    deadline = time.monotonic() + 30
    while client.get_domain("clinic").materialized_nodes == 0:
        assert time.monotonic() < deadline, "contexts seen twice were never materialised"
        time.sleep(0.3)
    domain = client.get_domain("clinic")
    assert domain.nodes == sum(domain.nodes_per_depth) and domain.plot_bytes <= domain.budget_bytes
    assert sum(domain.recent_hit_depths) >= 3 * len(NOVEL.split())
    # Served vectors now come from the deeper, materialised contexts: the same text is scored differently.
    assert client.classify("nurse-bot", [NOVEL])[0].probabilities != pytest.approx(first, abs=1e-6)

    stats = compute_stats(services)
    assert len(stats.plot_hit_depths) >= 2 and stats.plot_hit_depths[1] > 0   # compute saw depth-2 hits

    shown = hmi(services, "domain", "show", "clinic").stdout
    assert "adapted lower model" in shown and "budget" in shown and "recent hits" in shown
    assert re.search(r"depth 1\s+30522", shown), shown
    assert re.search(rf"{domain.materialized_nodes} materialised", shown), shown


def compute_stats(services):

    from hmi_proto.v1 import compute_pb2, compute_pb2_grpc
    from tests.helpers import internal_channel
    with internal_channel(services, services.compute_addrs[0]) as channel:
        return compute_pb2_grpc.ComputeStub(channel).Stats(compute_pb2.StatsRequest(), timeout=10)


def test_child_domain_serves_through_its_parent(services, client, tmp_path):
    parent = tmp_path / "general.txt"
    parent.write_text("the weather is nice today\nthe market opened higher\nthe team won the match\n")
    child = tmp_path / "sport.txt"
    child.write_text("the striker scored twice\nthe keeper saved a penalty\n")
    hmi(services, "domain", "build", "news", "--corpus", str(parent), "--split-layer", "1", "--context", "2")
    out = hmi(services, "domain", "build", "sport", "--corpus", str(child), "--split-layer", "1", "--context", "2",
              "--parent", "news", "--min-count", "1").stdout
    sport = json.loads(hmi(services, "domain", "show", "sport", "--raw").stdout)
    assert sport["spec"]["parent"] == "news" and int(sport["nodes_per_depth"][0]) < 30, out
    assert "parent=news" in hmi(services, "domain", "list").stdout

    hmi(services, "tenant", "register", "fan", "--domain", "sport", "--labels", "win,loss")
    results = client.classify("fan", ["the team won the match", "the striker scored a penalty"])
    assert [r.label in ("win", "loss") for r in results] == [True, True]

    refused = hmi(services, "domain", "build", "bad", "--corpus", str(child), "--split-layer", "2", "--parent",
                  "news", check=False)
    assert refused.returncode != 0 and "INVALID_ARGUMENT" in refused.stderr and "split layer" in refused.stderr
    refused = hmi(services, "domain", "delete", "news", check=False)
    assert refused.returncode != 0 and "FAILED_PRECONDITION" in refused.stderr
