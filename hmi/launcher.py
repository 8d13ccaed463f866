"""Starts the three services as separate processes with `hmi serve ...` (the command compose runs too),
waits until each reports SERVING on the standard health service, and stops them cleanly."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hmi.client import is_serving
from services.common.model_specs import model_name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hmi_command() -> list[str]:
    """The `hmi` console script beside this interpreter (as installed), else `python -m hmi.cli`."""
    script = Path(sys.executable).parent / "hmi"
    if script.exists():
        return [str(script)]
    found = shutil.which("hmi")
    return [found] if found else [sys.executable, "-m", "hmi.cli"]


@dataclass
class Service:
    name: str
    address: str
    args: list[str]
    process: subprocess.Popen | None = None
    log_file: IO | None = None


@dataclass
class ServiceSet:
    data_dir: Path
    gateway_addr: str
    store_addr: str
    compute_addrs: list[str]             # replicas of the first (default) model
    model: str = "minilm"                # one model, or several comma-separated (NAME=DIR,...): first = default
    log_dir: Path | None = None          # None: services log to this terminal
    extra_env: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    other_compute: dict[str, str] = field(default_factory=dict)   # one replica per further model: name -> address
    http_addr: str = "off"               # the gateway's HTTP front door (HOST:PORT), or "off"

    def __post_init__(self) -> None:
        for entry in self.model_entries()[1:]:
            self.other_compute.setdefault(model_name(entry), f"127.0.0.1:{free_port()}")

    @classmethod
    def on_free_ports(cls, data_dir: Path, computes: int = 1, **kwargs) -> "ServiceSet":
        kwargs.setdefault("http_addr", f"127.0.0.1:{free_port()}")
        return cls(data_dir=data_dir, gateway_addr=f"127.0.0.1:{free_port()}", store_addr=f"127.0.0.1:{free_port()}",
                   compute_addrs=[f"127.0.0.1:{free_port()}" for _ in range(computes)], **kwargs)

    def model_entries(self) -> list[str]:
        return [part.strip() for part in self.model.split(",") if part.strip()]

    def plan(self) -> list[Service]:
        entries = self.model_entries()
        every_model = [arg for entry in entries for arg in ("--model", entry)]
        services = [Service("store", self.store_addr, ["store", "--listen", self.store_addr,
                                                       "--data-dir", str(self.data_dir)] + every_model)]
        for index, address in enumerate(self.compute_addrs):
            services.append(Service(f"compute-{index}" if len(self.compute_addrs) > 1 else "compute", address,
                                    ["compute", "--listen", address, "--store", self.store_addr,
                                     "--model", entries[0]]))
        for entry in entries[1:]:
            name = model_name(entry)
            services.append(Service(f"compute-{name}", self.other_compute[name],
                                    ["compute", "--listen", self.other_compute[name], "--store", self.store_addr,
                                     "--model", entry]))
        routes = [f"{model_name(entries[0])}={','.join(self.compute_addrs)}"] + [
            f"{name}={address}" for name, address in self.other_compute.items()]
        services.append(Service("gateway", self.gateway_addr,
                                ["gateway", "--listen", self.gateway_addr, "--http", self.http_addr,
                                 "--store", self.store_addr]
                                + [arg for route in routes for arg in ("--compute", route)] + every_model))
        return services

    def start(self, timeout: float = 120.0, only: list[str] | None = None) -> None:
        """Starts every planned service (or the named ones) and waits for each to be SERVING."""
        planned = [s for s in self.plan() if only is None or s.name in only]
        # All services share this machine's cores: compute's torch takes half of them (measured on 2 cores:
        # 1 thread gave ~1.8x the throughput of torch's default, which oversubscribes the CPU).
        env = {"HMI_TORCH_THREADS": str(max(1, (os.cpu_count() or 2) // 2)),
               "HMI_MODEL_CACHE": str(self.data_dir / "models"), **os.environ, **self.extra_env}
        for service in planned:
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                service.log_file = open(self.log_dir / f"{service.name}.log", "ab")
                out = service.log_file
            service.process = subprocess.Popen(hmi_command() + ["serve"] + service.args, env=env,
                                               stdout=out, stderr=out, start_new_session=True)
            self.services = [s for s in self.services if s.name != service.name] + [service]
        for service in planned:
            self._wait_serving(service, timeout)

    def _wait_serving(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with code {service.process.returncode} while starting"
                                   + (f"; see {self.log_dir / (service.name + '.log')}" if self.log_dir else ""))
            if is_serving(service.address, timeout=0.5):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{service.name} did not report SERVING on {service.address} within {timeout:.0f}s")

    def stop(self, names: list[str] | None = None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stops services in reverse start order (gateway first); SIGKILL after `timeout`."""
        for service in reversed(self.services):
            if names is not None and service.name not in names or service.process is None:
                continue
            if service.process.poll() is None:
                service.process.send_signal(sig)
                try:
                    service.process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    service.process.kill()
                    service.process.wait()
            if service.log_file is not None:
                service.log_file.close()
                service.log_file = None
            service.process = None

    def running(self) -> list[str]:
        return [s.name for s in self.services if s.process is not None and s.process.poll() is None]

    def __enter__(self) -> "ServiceSet":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
