"""`hmi demo` on the real packaged MiniLM, small: the whole user path on real weights."""
from __future__ import annotations

import re
import subprocess

import pytest

from hmi.demo import TRAINED
from hmi.launcher import hmi_command

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)    # the longest test: three domains built and bridged, two tenants trained, real weights
def test_demo_runs_end_to_end_and_reports_throughput(tmp_path):
    result = subprocess.run(hmi_command() + ["demo", "--tenants", "12", "--requests", "40", "--clients", "4",
                                            "--data-dir", str(tmp_path), "--train-examples", "300",
                                            "--corpus-lines", "1500", "--new-tokens", "8", "--bridge-steps", "40"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ knowledge-tree nodes", result.stdout)
    assert re.search(r"40 requests for \d+ distinct tenants in [\d.]+s: [\d.]+ requests/s", result.stdout)
    assert "services stopped" in result.stdout
    # Generative SmolLM2 tenants served by the same deployment, streamed together.
    assert re.search(r"\d+ tokens for 3 tenants in [\d.]+s: [\d.]+ tokens/s", result.stdout), result.stdout[-3000:]
    assert len(re.findall(r"^  writer-\d: .*\n    -> \S", result.stdout, re.M)) == 3
    for tenant in TRAINED:   # real tenants where the labeled data is present: accuracy well above chance
        if not (tenant.data / "train.jsonl").exists():
            continue
        section = result.stdout.split(f"training tenant '{tenant.tenant_id}'")[1]
        found = re.search(r"eval accuracy on (\d+) held-out examples: ([\d.]+) \((\d+) classes\)", section)
        assert found, section[:2000]
        assert float(found[2]) > 1 / int(found[3]) + 0.1, section[:2000]
        assert len(re.findall(r"^  (ok |-- )", section.split("training tenant")[0], re.M)) == 4
