"""The committed generated stubs must match the .proto files (run `make protos` after editing them).

The generator stamps its own version into every stub (grpcio-tools' `GRPC_GENERATED_VERSION`, protobuf's
`Protobuf Python Version` and runtime check). Those stamps say which runtime the stubs need at least, not what
the .proto files say, and a fresh machine may install a newer generator than the one that wrote the committed
stubs; so the comparison masks them and checks the part that comes from the .proto files.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_STAMPS = [
    re.compile(rb"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(rb"^# Protobuf Python Version: .*$", re.M),
    re.compile(rb"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,[^)]*\)", re.S),
]


def _unstamped(text: bytes) -> bytes:
    for stamp in _STAMPS:
        text = stamp.sub(b"<generator stamp>", text)
    return text


def test_generator_stamps_are_masked_and_nothing_else():
    stub = (REPO / "hmi_proto" / "v1" / "compute_pb2_grpc.py").read_bytes()
    restamped = re.sub(rb"GRPC_GENERATED_VERSION = '[^']*'", b"GRPC_GENERATED_VERSION = '9.99.9'", stub)
    assert restamped != stub and _unstamped(restamped) == _unstamped(stub)
    assert _unstamped(stub.replace(b"class ComputeStub", b"class OtherStub")) != _unstamped(stub)


def test_generated_stubs_are_up_to_date(tmp_path):
    protos = sorted((REPO / "protos" / "hmi" / "v1").glob("*.proto"))
    assert protos, "no .proto files found"
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    stale = [str(p) for p in generated
             if _unstamped((tmp_path / p).read_bytes()) != _unstamped((REPO / p).read_bytes())]
    assert not stale, f"stale generated stubs {stale}: run `make protos` and commit the result"
