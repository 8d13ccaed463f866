"""Generates the Python stubs of protos/hmi/v1/*.proto: every proto into the `hmi_proto.v1` package (what the
services use), and the public ones into the slim client's `hmi_client.v1` (clients/python).

protoc names a generated module after the .proto's path (`hmi/v1/...` -> `hmi.v1`); the stubs live in
packages of their own, apart from the `hmi` CLI, so the imports between them are rewritten. The wire names
(package `hmi.v1`, services `hmi.v1.Gateway`, ...) stay as they are, and both copies of a public proto
register the same descriptor, so they can be loaded in one process.

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
# The public API: what clients in any language need. None of them imports an internal proto (compute,
# knowledge_store); tests/test_protos_public.py compiles each with only these on the include path.
PUBLIC = ("hmi/v1/tensor.proto", "hmi/v1/catalog.proto", "hmi/v1/gateway.proto", "grpc/health/v1/health.proto")
# folder -> (its Python package, the protos it gets; None = every proto of hmi/v1)
TARGETS = {"hmi_proto/v1": ("hmi_proto.v1", None),
           "clients/python/hmi_client/v1": ("hmi_client.v1", [p for p in PUBLIC if p.startswith(SOURCE_PACKAGE)])}
_IMPORT = re.compile(r"^from hmi\.v1(\.\w+)? import ", re.MULTILINE)
_MODULE_NAME = re.compile(r"'hmi\.v1\.(\w+_pb2)'")


def rewrite(text: str, package: str) -> str:
    """Points a generated module's imports and module name at `package` (e.g. `hmi_proto.v1`)."""
    text = _IMPORT.sub(lambda m: f"from {package}{m[1] or ''} import ", text)
    return _MODULE_NAME.sub(lambda m: f"'{package}.{m[1]}'", text)


def generate(out: Path) -> list[Path]:
    """Writes the stubs under OUT/<target>/; returns the files written, relative to OUT."""
    every = sorted(p.relative_to(PROTOS).as_posix() for p in (PROTOS / SOURCE_PACKAGE).glob("*.proto"))
    if not every:
        raise SystemExit(f"no .proto files in {PROTOS / SOURCE_PACKAGE}")
    written = []
    for target, (package, sources) in TARGETS.items():
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={scratch}",
                            f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", *(sources or every)],
                           cwd=PROTOS, check=True)
            for generated in sorted((Path(scratch) / SOURCE_PACKAGE).glob("*.py*")):
                path = Path(target) / generated.name
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                (out / path).write_text(rewrite(generated.read_text(encoding="utf-8"), package), encoding="utf-8")
                written.append(path)
    return written


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS.parent)
