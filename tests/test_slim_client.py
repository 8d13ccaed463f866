"""The slim client (clients/python) installs into a fresh virtual environment without torch and talks to a
running deployment: both services, streamed generation, typed errors. Skipped, with the reason, where its
two dependencies (grpcio, protobuf) cannot be installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
SCRIPT = r'''
import json, sys
import hmi_client
from hmi_client import HMIClient, NotFound, FailedPrecondition, is_serving
try:
    import torch  # noqa: F401
    has_torch = True
except ImportError:
    has_torch = False
with HMIClient(sys.argv[1], timeout=60) as hmi:
    hmi.build_domain("slim", "", split_layer=0, context=1, min_count=1)
    hmi.build_domain("slim-stories", "", split_layer=0, context=1, min_count=1, model="gen")
    tenant = hmi.register_tenant("slim-critic", "slim", ["neg", "pos"], seed=4)
    hmi.register_tenant("slim-embedder", "slim", seed=5)
    hmi.register_tenant("slim-bard", "slim-stories", seed=6)
    stream = hmi.generate("slim-bard", "the service was", max_new_tokens=6)
    pieces = [message.text for message in stream]
    errors = []
    for call in (lambda: hmi.classify("nobody", ["hi"]), lambda: hmi.classify("slim-embedder", ["hi"]),
                 lambda: hmi.generate("nobody", "hi").collect()):
        try:
            call()
        except (NotFound, FailedPrecondition) as error:
            errors.append([type(error).__name__, error.code().name])
    print(json.dumps({
        "torch": has_torch, "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy",
                                                                                            "transformers")),
        "serving": is_serving(sys.argv[1]), "labels": list(tenant.spec.labels),
        "classify": [[p.label, p.probabilities] for p in hmi.classify("slim-critic", ["a fine film"])],
        "embed": hmi.embed("slim-embedder", ["a fine film"]), "pieces": pieces, "errors": errors,
        "tenants": sorted(t.spec.tenant_id for t in hmi.list_tenants().tenants)}))
'''


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slim-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                           str(REPO / "clients" / "python")], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"cannot install grpcio and protobuf into a fresh environment: {done.stderr.strip()[-300:]}")
    return python


def test_the_slim_client_works_without_torch(fresh_python, front_door):
    done = subprocess.run([str(fresh_python), "-c", SCRIPT, front_door.gateway_addr], capture_output=True, text=True,
                          timeout=120, cwd=fresh_python.parent,
                          env={**os.environ, "HMI_TOKEN": front_door.admin_token})    # the client reads HMI_TOKEN
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["torch"] is False and report["modules"] == [], "the slim client must not need torch or numpy"
    assert report["serving"] and report["labels"] == ["neg", "pos"]
    with front_door.client(timeout=60) as client:
        expected = client.classify("slim-critic", ["a fine film"])[0]
        assert report["classify"][0][0] == expected.label
        assert report["classify"][0][1] == pytest.approx(expected.probabilities, abs=1e-6)
        assert report["embed"][0] == pytest.approx(client.embed("slim-embedder", ["a fine film"])[0], abs=1e-6)
        greedy = client.generate("slim-bard", "the service was", max_new_tokens=6).collect()
    assert "".join(report["pieces"]) == greedy.text and len(report["pieces"]) > 1
    assert report["errors"] == [["NotFound", "NOT_FOUND"], ["FailedPrecondition", "FAILED_PRECONDITION"],
                                ["NotFound", "NOT_FOUND"]]
    assert {"slim-critic", "slim-embedder", "slim-bard"} <= set(report["tenants"])
