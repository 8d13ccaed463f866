"""compose.yaml runs exactly the `hmi serve ...` commands the integration tests start, with valid flags; it
scales (no fixed compute port, one DNS name per model that the gateway resolves to every replica), its profiles
give MiniLM only, both models and GPU replicas, and compute's torch threads match its CPU limit."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from hmi.cli import build_parser
from hmi.launcher import ServiceSet

REPO = Path(__file__).resolve().parent.parent


def test_every_compose_command_is_an_hmi_serve_command_our_cli_accepts(tmp_path):
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"store", "compute", "compute-smollm2", "compute-gpu", "compute-smollm2-gpu", "gateway"}
    launched = {service.name: service.args
                for service in ServiceSet.on_free_ports(tmp_path, model="minilm,smollm2").plan()}
    parser = build_parser()
    for name, service in services.items():
        command = service["command"]
        kind = name.split("-")[0]
        assert command[:2] == ["serve", kind], f"{name} must run `hmi serve {kind}`"
        args = parser.parse_args(command)          # the image's entrypoint is `hmi`
        assert args.service == kind
        flags = {arg for arg in command if arg.startswith("--")}
        assert flags <= {arg for arg in launched[name.removesuffix("-gpu")] if arg.startswith("--")}, \
            f"{name}: compose uses flags the tests never start the service with"
        assert service["healthcheck"]["test"][1:3] == ["hmi", "health"]
    assert any(volume.endswith(":/data") for volume in services["store"]["volumes"])
    assert "ports" not in services["compute"], "compute must not publish a fixed port, or --scale breaks"
    # Every model a compute serves is known to the store and the gateway, which route to it by name.
    for kind in ("store", "gateway"):
        assert services[kind]["command"].count("--model") == 2
    gateway = services["gateway"]["command"]
    routes = {gateway[i + 1].split("=")[0] for i, arg in enumerate(gateway) if arg == "--compute"}
    assert routes == {"minilm", "smollm2"}


def load() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())["services"]


def test_profiles_give_minilm_only_both_models_and_gpu_replicas_under_the_same_names():
    services = load()
    always = {name for name, service in services.items() if not service.get("profiles")}
    assert always == {"store", "compute", "gateway"}, "`docker compose up` must be MiniLM only"
    assert services["compute-smollm2"]["profiles"] == ["smollm2"]
    gateway = services["gateway"]
    assert set(gateway["depends_on"]) == {"store"}, "the gateway must not wait for computes a profile leaves out"
    assert gateway["environment"]["HMI_REQUIRED_MODELS"].endswith(":-minilm}")
    routes = dict(gateway["command"][i + 1].split("=", 1) for i, arg in enumerate(gateway["command"])
                  if arg == "--compute")
    for name in ("compute-gpu", "compute-smollm2-gpu"):
        service = services[name]
        assert service["profiles"] == ["gpu"] and service["image"] == "hmi:gpu"
        assert service["build"]["args"]["HMI_EXTRAS"].split(",")[0] == "gpu"
        assert service["environment"]["HMI_DEVICE"] == "cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
        model = service["command"][service["command"].index("--model") + 1]
        alias = service["networks"]["default"]["aliases"][0]
        assert routes[model] == f"dns:///{alias}:50053", f"{name} must answer to the name the gateway resolves"


def test_cpu_compute_threads_match_its_cpu_limit_and_the_default_image_is_cpu_only():
    services = load()
    for name in ("compute", "compute-smollm2"):
        service = services[name]
        assert service["environment"]["HMI_TORCH_THREADS"] == service["cpus"] == "${HMI_COMPUTE_CPUS:-2}"
        assert service["environment"]["HMI_DEVICE"] == "cpu" and service["mem_limit"]
        assert "/cpu" in service["build"]["args"]["PIP_EXTRA_INDEX_URL"], "CPU PyTorch by default"
        assert "ports" not in service and "container_name" not in service, "--scale needs both absent"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed (CI has it)")
def test_docker_compose_accepts_the_file_with_every_profile():
    for profile in ([], ["--profile", "smollm2"], ["--profile", "gpu"]):
        result = subprocess.run(["docker-compose", "-f", str(REPO / "compose.yaml"), *profile, "config", "-q"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_the_image_caches_dependencies_before_the_code_and_runs_as_non_root():
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")     # continuation lines joined
    lines = [line.split() for line in text.splitlines() if line and line[0].isupper()]
    steps = [" ".join(words) for words in lines]
    first_code = next(i for i, step in enumerate(steps) if step.startswith("COPY services"))
    requirements = next(i for i, step in enumerate(steps) if "requirements.txt" in step)
    assert requirements < first_code, "dependencies must be installed before the code is copied"
    assert not any(step.startswith("COPY") and "pyproject.toml" not in step and "clients" not in step
                   for step in steps[:requirements]), "only pyproject.toml and the client may precede the dependencies"
    user = [step for step in steps if step.startswith("USER")]
    assert user and user[-1] not in ("USER root", "USER 0")


def test_every_service_of_every_profile_gets_the_service_secret_and_only_the_gateway_the_admin_token():
    """Authentication is on, so a service without its secret would not start: every compute (CPU or GPU, any
    profile) reads the service secret from a compose secret, never from a variable or its command line."""
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    declared = compose["secrets"]
    for name, service in compose["services"].items():
        command = service["command"]
        secrets = set(service.get("secrets", []))
        assert secrets <= set(declared), f"{name} mounts an undeclared secret"
        path = command[command.index("--service-secret-file") + 1]
        assert path == "/run/secrets/hmi_service_secret" and "hmi_service_secret" in secrets, name
        if name == "gateway":
            assert command[command.index("--admin-token-file") + 1] == "/run/secrets/hmi_admin_token"
            assert "hmi_admin_token" in secrets
        else:
            assert "--admin-token-file" not in command and "hmi_admin_token" not in secrets, name
        assert "--auth" not in command, f"{name}: authentication stays on"
        assert not {"HMI_SERVICE_SECRET", "HMI_ADMIN_TOKEN"} & set(service.get("environment") or {}), name
