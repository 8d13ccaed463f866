"""The committed generated stubs must match the .proto files (run `make protos` after editing them)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_up_to_date(tmp_path):
    protos = sorted((REPO / "protos" / "hmi" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    stale = [str(p) for p in generated if (tmp_path / p).read_bytes() != (REPO / p).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit the result"
