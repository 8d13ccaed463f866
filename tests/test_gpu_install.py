"""The GPU install resolves: torch as the Makefile and Dockerfile pin it, from the registry's default index (a
CUDA build), together with the `gpu` extra, asks pip for one consistent set in which CuPy, NVRTC and torch's
CUDA runtime share one CUDA major. pip resolves without downloading wheels (`--dry-run --report`); this
machine's pip settings (local wheel folders, caps) are left out so the answer is the one a GPU image build gets.
Skipped only when the registry cannot be reached."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OFFLINE = ("Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "No route to host")


def torch_pin() -> str:
    pins = {re.search(r"torch==[\w.]+", (REPO / name).read_text()).group(0) for name in ("Makefile", "Dockerfile")}
    assert len(pins) == 1, f"the Makefile and the Dockerfile pin different torch releases: {pins}"
    return pins.pop()


def major(version: str) -> int:
    return int(version.split(".")[0])


@pytest.mark.timeout(240)
def test_torch_and_the_gpu_extra_resolve_to_one_cuda_major(tmp_path):
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads pyproject.toml")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), torch_pin(), *extras["gpu"]]
    if os.environ.get("PIP_CERT"):
        command += ["--cert", os.environ["PIP_CERT"]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=220,
                            env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    if result.returncode != 0 and any(sign in result.stderr for sign in OFFLINE):
        pytest.skip(f"the package registry cannot be reached: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, f"the GPU requirement set does not resolve:\n{result.stderr[-3000:]}"
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["torch"] == torch_pin().split("==")[1], "a CPU or other torch build was picked"
    cuda = major(resolved["nvidia-cuda-runtime"])           # the CUDA major torch is built for
    cupy = [name for name in resolved if name.startswith("cupy-cuda")]
    assert cupy == [f"cupy-cuda{cuda}x"], f"CuPy {cupy} for a torch built for CUDA {cuda}"
    assert major(resolved["nvidia-cuda-nvrtc"]) == cuda
    assert major(resolved["cuda-toolkit"]) == cuda
