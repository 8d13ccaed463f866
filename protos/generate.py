"""Generates the Python stubs of protos/hmi/v1/*.proto into the `hmi_proto.v1` package.

protoc names a generated module after the .proto's path (`hmi/v1/...` -> `hmi.v1`); the stubs live in a
package of their own, apart from the `hmi` CLI, so the imports between them are rewritten to
`hmi_proto.v1`. The wire names (package `hmi.v1`, services `hmi.v1.Compute`, ...) stay as they are.

    python protos/generate.py [OUT]     # OUT defaults to the repository root (`make protos`)
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
SOURCE_PACKAGE = "hmi/v1"
TARGET_PACKAGE = "hmi_proto/v1"
_IMPORT = re.compile(r"^from hmi\.v1 import ", re.MULTILINE)
_MODULE_NAME = re.compile(r"'hmi\.v1\.(\w+_pb2)'")


def rewrite(text: str) -> str:
    """Points a generated module's imports and module name at `hmi_proto.v1`."""
    return _MODULE_NAME.sub(r"'hmi_proto.v1.\1'", _IMPORT.sub("from hmi_proto.v1 import ", text))


def generate(out: Path) -> list[Path]:
    """Writes the stubs under OUT/hmi_proto/v1/; returns the files written, relative to OUT."""
    sources = sorted((PROTOS / SOURCE_PACKAGE).glob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files in {PROTOS / SOURCE_PACKAGE}")
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={scratch}",
                        f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", *map(str, sources)], check=True)
        for generated in sorted((Path(scratch) / SOURCE_PACKAGE).glob("*.py*")):
            target = Path(TARGET_PACKAGE) / generated.name
            (out / target).parent.mkdir(parents=True, exist_ok=True)
            (out / target).write_text(rewrite(generated.read_text(encoding="utf-8")), encoding="utf-8")
            written.append(target)
    return written


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS.parent)
