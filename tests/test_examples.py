"""The Node.js example (examples/node) against a running deployment: classify, embed and streamed generation
give what the Python client gets. Its packages come from the npm registry into a temporary folder; the test
is skipped, with the reason, where node or the registry is missing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "node"


@pytest.fixture(scope="module")
def node_example(tmp_path_factory) -> Path:
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are not installed")
    folder = tmp_path_factory.mktemp("node-example")
    for name in ("package.json", "client.js"):
        shutil.copy(EXAMPLE / name, folder / name)
    try:
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder,
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("npm install took over 180 s (is the npm registry reachable?)")
    if done.returncode != 0:
        pytest.skip(f"npm install failed (is the npm registry reachable?): {done.stderr.strip()[-300:]}")
    return folder


def run_node(folder: Path, services, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HMI_GATEWAY_ADDR": services.gateway_addr, "HMI_PROTOS": str(REPO / "protos"),
           "HMI_TOKEN": services.admin_token}
    return subprocess.run(["node", "client.js", *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=60)


def test_the_node_example_classifies_embeds_and_streams(node_example, front_door):
    with front_door.client(timeout=60) as client:
        client.build_domain("node-reviews", "", split_layer=0, context=1, min_count=1)
        client.build_domain("node-stories", "", split_layer=0, context=1, min_count=1, model="gen")
        client.register_tenant("node-critic", "node-reviews", ["neg", "pos"], seed=1)
        client.register_tenant("node-bard", "node-stories", [], seed=2)
        texts = ["a fine film", "a dull plot"]
        classified = run_node(node_example, front_door, "classify", "node-critic", *texts)
        assert classified.returncode == 0, classified.stderr
        for line, expected in zip(classified.stdout.splitlines(), client.classify("node-critic", texts)):
            result = json.loads(line)
            assert result["label"] == expected.label
            assert result["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)
        embedded = run_node(node_example, front_door, "embed", "node-critic", texts[0])
        assert embedded.returncode == 0, embedded.stderr
        assert json.loads(embedded.stdout)["embedding"] == pytest.approx(client.embed("node-critic", texts[:1])[0],
                                                                         abs=1e-6)
        generated = run_node(node_example, front_door, "generate", "node-bard", "the service was", "8")
        assert generated.returncode == 0, generated.stderr
        result = json.loads(generated.stdout)
        assert result["text"] == client.generate("node-bard", "the service was", max_new_tokens=8).collect().text
        assert result["pieces"] > 1 and result["finish_reason"] in ("length", "stop")
        missing = run_node(node_example, front_door, "classify", "nobody", "hi")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
