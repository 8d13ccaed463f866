"""The import rules of the layout (docs/architecture.md), checked on every module's source:

- no module under services/ imports the CLI package `hmi`;
- a service imports another service only through its wire client (`services.<other>.client`), and outside
  compute only `services/compute/client.py` speaks compute's protocol (its generated stubs);
- the shared libraries (`hmi_proto`, `hmi_kernels`, `models`, `services.common`) import no service, and each
  only what lies below it: hmi_errors, hmi_proto and hmi_kernels nothing of ours, models hmi_kernels and hmi_errors;
- in the gateway, the core (services/gateway/core) imports no door and no transport (grpc, FastAPI); the doors
  (the gRPC servicer, each HTTP door) import the core, never each other; the policy modules beneath the core
  import neither.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVICES = sorted(p.name for p in (REPO / "services").iterdir() if (p / "__init__.py").is_file() and p.name != "common")
OURS = ("hmi", "hmi_errors", "hmi_proto", "hmi_kernels", "models", "training", "services", "bench", "tests")
SHARED_MAY_IMPORT = {
    "hmi_errors": (),
    "hmi_proto": ("hmi_proto",),
    "hmi_kernels": ("hmi_kernels",),
    "services.common": ("services.common", "hmi_proto", "hmi_errors"),
    "models": ("models", "hmi_kernels", "hmi_errors"),
    "training": ("training", "models", "hmi_kernels", "hmi_errors"),     # a library beside models, not a service
}


def every_import(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement names, ours or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module of ours an import statement names (function-level imports included), with its line."""
    return [(line, name) for line, name in every_import(path) if name.split(".")[0] in OURS]


def modules(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "_pb2" not in p.name)


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_services_do_not_import_the_cli_package():
    offending = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in modules("services")
                 for line, name in imports(path) if within(name, "hmi")]
    assert not offending, offending


def test_a_service_reaches_another_only_through_its_client():
    offending = []
    for service in SERVICES:
        for path in modules(f"services/{service}"):
            for line, name in imports(path):
                other = next((s for s in SERVICES if within(name, f"services.{s}")), None)
                if other and other != service and not within(name, f"services.{other}.client"):
                    offending.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not offending, offending


def test_only_the_compute_client_speaks_computes_protocol_outside_compute():
    offending = [f"{path.relative_to(REPO)}:{line} imports {name}"
                 for folder in ("services", "hmi", "bench") for path in modules(folder)
                 if not path.is_relative_to(REPO / "services" / "compute")
                 for line, name in imports(path) if name.startswith("hmi_proto.v1.compute_pb2")]
    assert not offending, offending


def test_shared_libraries_import_only_what_lies_below_them():
    offending = []
    for package, allowed in SHARED_MAY_IMPORT.items():
        for path in modules(package.replace(".", "/")):
            for line, name in imports(path):
                if not any(within(name, below) for below in allowed):
                    offending.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not offending, offending


GATEWAY = REPO / "services" / "gateway"
HTTP_DOORS = ("openai_api", "hmi_api", "kserve", "tei")       # services/gateway/http/<door>.py
DOOR_MODULES = ("services.gateway.servicer", "services.gateway.http")


def test_the_gateway_core_knows_no_door_and_no_transport():
    offending = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in modules("services/gateway/core")
                 for line, name in every_import(path)
                 if name.split(".")[0] in ("grpc", "fastapi", "starlette", "uvicorn")
                 or any(within(name, door) for door in DOOR_MODULES)
                 or name.startswith("hmi_client.v1.gateway_pb2")]
    assert not offending, offending


def test_doors_import_the_core_never_each_other():
    offending = []
    servicer = GATEWAY / "servicer.py"
    offending += [f"servicer.py:{line} imports {name}" for line, name in imports(servicer)
                  if within(name, "services.gateway.http")]
    for door in HTTP_DOORS:
        path = GATEWAY / "http" / f"{door}.py"
        assert path.is_file(), path
        others = [f"services.gateway.http.{other}" for other in HTTP_DOORS + ("app",) if other != door]
        offending += [f"http/{door}.py:{line} imports {name}" for line, name in imports(path)
                      if any(within(name, other) for other in others) or within(name, "services.gateway.servicer")]
    assert not offending, offending


def test_the_policy_beneath_the_core_imports_neither_core_nor_doors():
    offending = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in sorted(GATEWAY.glob("*.py"))
                 if path.name not in ("servicer.py", "server.py")
                 for line, name in imports(path)
                 if within(name, "services.gateway.core") or any(within(name, door) for door in DOOR_MODULES)]
    assert not offending, offending


def test_the_rules_see_the_imports_they_check():
    """Guards the checker itself: it finds function-level imports and every service."""
    assert {"compute", "gateway", "knowledge_store"} <= set(SERVICES) and "training" not in SERVICES
    server = imports(REPO / "services" / "compute" / "server.py")
    assert any(within(name, "services.knowledge_store.client") for _, name in server)


def test_the_slim_client_imports_only_grpc_protobuf_and_the_standard_library():
    """clients/python installs with grpcio and protobuf alone (tests/test_slim_client.py runs it without torch)."""
    import sys
    allowed = {"hmi_client", "grpc", "google"} | set(sys.stdlib_module_names)
    offending = []
    for path in sorted((REPO / "clients" / "python" / "hmi_client").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            offending += [f"{path.relative_to(REPO)} imports {n}" for n in names if n.split(".")[0] not in allowed]
    assert not offending, offending


def test_no_module_of_ours_shadows_an_installed_package():
    """A top-level package of ours, or a bench script (run with bench/ first on sys.path), named like an installed
    distribution's import name hides it from every library that imports it (transformers imports `kernels`)."""
    from importlib.metadata import packages_distributions
    installed = {name for name, dists in packages_distributions().items() if set(dists) != {"hmi"}}
    ours = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    scripts = {p.stem for p in (REPO / "bench").glob("*.py")}
    assert not (ours | scripts) & installed, sorted((ours | scripts) & installed)
