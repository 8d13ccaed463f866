"""Generates the Python stubs of protos/hmi/v1/*.proto, each once: the public protos into the slim client's
`hmi_client.v1` (clients/python: what clients and the services alike import), the internal ones (compute,
knowledge_store) into `hmi_proto.v1`, whose imports of public protos point at `hmi_client.v1`.

protoc names a generated module after the .proto's path (`hmi/v1/...` -> `hmi.v1`); the stubs live in
packages of their own, apart from the `hmi` CLI, so the imports between them are rewritten. The wire names
(package `hmi.v1`, services `hmi.v1.Gateway`, ...) stay as they are.

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
PUBLIC = ("hmi/v1/tensor.proto", "hmi/v1/catalog.proto", "hmi/v1/gateway.proto", "hmi/v1/fine_tuning.proto",
          "grpc/health/v1/health.proto")
PUBLIC_PACKAGE = "hmi_client.v1"
PUBLIC_MODULES = {Path(p).stem + "_pb2" for p in PUBLIC if p.startswith(SOURCE_PACKAGE)}
# folder -> (its Python package, whether it gets the public protos or the internal ones)
TARGETS = {"clients/python/hmi_client/v1": (PUBLIC_PACKAGE, True), "hmi_proto/v1": ("hmi_proto.v1", False)}
_IMPORT = re.compile(r"^from hmi\.v1(?:\.(\w+))? import (\w+|\*)", re.MULTILINE)
_MODULE_NAME = re.compile(r"'hmi\.v1\.(\w+_pb2)'")


def rewrite(text: str, package: str) -> str:
    """Points a generated module's imports at the package each imported stub lives in (a public one's:
    hmi_client.v1) and its own module name at `package`."""
    def imported(m: re.Match) -> str:
        module = m[1] or m[2]
        home = PUBLIC_PACKAGE if module.removesuffix("_grpc") in PUBLIC_MODULES else package
        return f"from {home}.{m[1]} import {m[2]}" if m[1] else f"from {home} import {m[2]}"

    text = _IMPORT.sub(imported, text)
    return _MODULE_NAME.sub(lambda m: f"'{package}.{m[1]}'", text)


def generate(out: Path) -> list[Path]:
    """Writes the stubs under OUT/<target>/; returns the files written, relative to OUT."""
    every = sorted(p.relative_to(PROTOS).as_posix() for p in (PROTOS / SOURCE_PACKAGE).glob("*.proto"))
    if not every:
        raise SystemExit(f"no .proto files in {PROTOS / SOURCE_PACKAGE}")
    written = []
    for target, (package, public) in TARGETS.items():
        sources = [p for p in every if (p in PUBLIC) == public]
        with tempfile.TemporaryDirectory() as scratch:
            subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={scratch}",
                            f"--pyi_out={scratch}", f"--grpc_python_out={scratch}", *sources],
                           cwd=PROTOS, check=True)
            made = {Path(p).stem for p in sources}
            for generated in sorted((Path(scratch) / SOURCE_PACKAGE).glob("*.py*")):
                if generated.name.split("_pb2")[0] not in made:
                    continue
                path = Path(target) / generated.name
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                (out / path).write_text(rewrite(generated.read_text(encoding="utf-8"), package), encoding="utf-8")
                written.append(path)
    return written


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS.parent)
