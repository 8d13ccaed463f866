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
    assert set(services) == {"store", "compute", "gateway"}
    launched = {service.name: service.args for service in ServiceSet.on_free_ports(tmp_path).plan()}
    parser = build_parser()
    for name, service in services.items():
        command = service["command"]
        assert command[:2] == ["serve", name], f"{name} must run `hmi serve {name}`"
        args = parser.parse_args(command)          # the image's entrypoint is `hmi`
        assert args.service == name
        flags = {arg for arg in command if arg.startswith("--")}
        assert flags <= {arg for arg in launched[name] if arg.startswith("--")}, \
            f"{name}: compose uses flags the tests never start the service with"
        assert service["healthcheck"]["test"][1:3] == ["hmi", "health"]
    assert any(volume.endswith(":/data") for volume in services["store"]["volumes"])
    assert "ports" not in services["compute"], "compute must not publish a fixed port, or --scale breaks"
