"""The `hmi` CLI against running services: the commands a user types, their output and exit codes."""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from hmi.launcher import hmi_command
from models.adapter_format import random_adapter, serialize_adapter
from models.dims import ModelDims
from tests.helpers import cli_env

pytestmark = pytest.mark.integration


def hmi(services, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = cli_env(services)
    result = subprocess.run(hmi_command() + list(args), env=env, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"hmi {' '.join(args)} failed: {result.stderr}"
    return result


def test_domain_tenant_classify_embed_round_trip(services, tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the service was great\nthe service was slow\nI would like a refund\n")
    out = hmi(services, "domain", "build", "cli", "--corpus", str(corpus), "--split-layer", "2", "--context", "3",
              "--min-count", "2").stdout
    assert "domain cli" in out and "nodes" in out
    assert json.loads(hmi(services, "domain", "show", "cli", "--raw").stdout)["spec"]["split_layer"] == 2
    assert "cli" in hmi(services, "domain", "list").stdout

    first = hmi(services, "tenant", "register", "cli-t", "--domain", "cli", "--labels", "neg,pos").stdout
    first_version = int(re.search(r"adapter v(\d+)", first).group(1))
    dims = ModelDims.from_dir(tiny_model_dir)
    adapter = tmp_path / "adapter.safetensors"
    adapter.write_bytes(serialize_adapter(random_adapter(dims, num_labels=2, rank=4, first_layer=2, seed=4)))
    second = hmi(services, "tenant", "register", "cli-t", "--domain", "cli", "--labels", "neg,pos",
                 "--adapter", str(adapter)).stdout
    second_version = int(re.search(r"adapter v(\d+)", second).group(1))
    assert second_version > first_version       # versions are change-log revisions: they only grow
    assert json.loads(hmi(services, "tenant", "show", "cli-t").stdout)["adapter_version"] == str(second_version)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused = hmi(services, "tenant", "register", "cli-t", "--domain", "cli", "--labels", "neg,pos",
                  "--adapter", str(empty), check=False)
    assert refused.returncode != 0 and "empty" in refused.stderr
    assert "cli-t" in hmi(services, "tenant", "list", "--domain", "cli").stdout

    lines = hmi(services, "classify", "cli-t", "the service was great", "a refund please").stdout.splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("neg", "pos") for line in lines)
    vector = json.loads(hmi(services, "embed", "cli-t", "hello").stdout)
    assert len(vector) == dims.hidden
    count, pieces = hmi(services, "tokenize", "cli-t", "hello world").stdout.strip().split("\t")
    tokens = pieces.split(" ")
    assert int(count) == len(tokens) >= 3 and tokens[0].endswith(':"[CLS]"') and tokens[-1].endswith(':"[SEP]"')

    assert "deleted" in hmi(services, "tenant", "delete", "cli-t").stdout
    failed = hmi(services, "classify", "cli-t", "hello", check=False)
    assert failed.returncode != 0 and "NOT_FOUND" in failed.stderr and "cli-t" in failed.stderr


def test_failed_calls_exit_non_zero_with_the_server_message(services):
    result = hmi(services, "tenant", "register", "x", "--domain", "missing-domain", "--labels", "a,b", check=False)
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "missing-domain" in result.stderr
    result = hmi(services, "domain", "build", "bad", "--split-layer", "1", check=False)
    assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr


def test_unreachable_gateway_says_how_to_start_it(services):
    env = {**os.environ, "HMI_GATEWAY_ADDR": "127.0.0.1:1"}
    result = subprocess.run(hmi_command() + ["tenant", "list", "--timeout", "3"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr and "hmi up" in result.stderr
