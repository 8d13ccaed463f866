"""`hmi demo` on the real packaged MiniLM, small: the whole user path on real weights."""
from __future__ import annotations

import re
import subprocess

import pytest

from hmi.demo import SST2
from hmi.launcher import hmi_command

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end_and_reports_throughput(tmp_path):
    result = subprocess.run(hmi_command() + ["demo", "--tenants", "12", "--requests", "40", "--clients", "4",
                                            "--data-dir", str(tmp_path), "--train-examples", "300",
                                            "--corpus-lines", "1500"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ knowledge-tree nodes", result.stdout)
    assert re.search(r"40 requests for \d+ distinct tenants in [\d.]+s: [\d.]+ requests/s", result.stdout)
    assert "services stopped" in result.stdout
    if SST2.exists():  # the trained tenant: real labels, accuracy well above chance (0.5)
        accuracy = float(re.search(r"eval accuracy on the 872 SST-2 validation sentences: ([\d.]+)", result.stdout)[1])
        assert accuracy > 0.6, result.stdout[-2000:]
        assert result.stdout.count("movie-critic ") == 4
