"""compose.yaml runs exactly the `hmi serve ...` commands the integration tests start, with valid flags."""
from __future__ import annotations

from pathlib import Path

import yaml

from hmi.cli import build_parser
from hmi.launcher import ServiceSet

REPO = Path(__file__).resolve().parent.parent


def test_every_compose_command_is_an_hmi_serve_command_our_cli_accepts(tmp_path):
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"store", "compute", "compute-smollm2", "gateway"}
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
        assert flags <= {arg for arg in launched[name] if arg.startswith("--")}, \
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
