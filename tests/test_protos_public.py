"""The public protos stand on their own: each compiles with protoc when only the public protos are on the
include path (so none imports the internal compute or knowledge_store protos), and each declares the
options other languages' generators need. The internal protos may import public ones."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "protos"))
from generate import PUBLIC  # noqa: E402

INTERNAL = ("hmi/v1/compute.proto", "hmi/v1/knowledge_store.proto")
OPTIONS = ("go_package", "java_package", "java_multiple_files", "csharp_namespace")


def compile_alone(proto: str, include: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    descriptor_set = out / (proto.replace("/", "_") + ".pb")
    done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{include}", f"--python_out={out}",
                           f"--descriptor_set_out={descriptor_set}", proto], cwd=include, capture_output=True,
                          text=True)
    assert done.returncode == 0, f"{proto} does not compile with only the public protos: {done.stderr}"
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    return next(f for f in files if f.name == proto)


@pytest.mark.parametrize("proto", PUBLIC)
def test_each_public_proto_compiles_with_only_public_protos(proto, tmp_path):
    public = tmp_path / "public"
    for name in PUBLIC:
        (public / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "protos" / name, public / name)
    (tmp_path / "out").mkdir()
    descriptor = compile_alone(proto, public, tmp_path / "out")
    assert not set(descriptor.dependency) & set(INTERNAL)
    for option in OPTIONS:
        assert descriptor.options.HasField(option), f"{proto} lacks option {option}"


def test_the_public_api_is_all_there_and_internal_protos_build_on_it(tmp_path):
    descriptor = compile_alone("hmi/v1/gateway.proto", REPO / "protos", tmp_path)
    services = {service.name: [m.name for m in service.method] for service in descriptor.service}
    assert {"Classify", "Embed", "Generate"} <= set(services["Gateway"])
    assert {"RegisterTenant", "GetTenant", "ListTenants", "BuildDomain", "GetAdapter"} <= set(services["Admin"])
    store = compile_alone("hmi/v1/knowledge_store.proto", REPO / "protos", tmp_path)
    assert "hmi/v1/catalog.proto" in store.dependency and list(store.public_dependency)
    # Existing Python code keeps reading the shared records from the store's module (a public import).
    from hmi_client.v1 import catalog_pb2
    from hmi_proto.v1 import knowledge_store_pb2
    assert knowledge_store_pb2.Tenant is catalog_pb2.Tenant
