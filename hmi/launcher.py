"""Starts the three services as separate processes with `hmi serve ...` (the command compose runs too),
waits until each reports SERVING on the standard health service, and stops them cleanly.

Authentication is on unless `auth` is False: the launcher makes the admin token (HMI_DATA_DIR/admin.token)
and the service secret (HMI_DATA_DIR/service.secret) on first start, mode 0600, unless HMI_ADMIN_TOKEN /
HMI_SERVICE_SECRET are set, and hands the services the files (never a secret on a command line).

Children die with the process that started them: on Linux the kernel sends them SIGTERM when it exits, however
it exits (PR_SET_PDEATHSIG, which each service asks for first thing: `die_with_supervisor` in
services/common/server.py, not between fork and exec here, where Python code in the child of a threaded process
is unsafe), and every service also stops by itself once its parent is gone (HMI_SUPERVISOR_PID). The kernel
signal follows the *thread* that started the child, so start services from a thread that lives as long as
they should (`hmi up` uses its main thread).
Keeping them running (restarts with backoff) is hmi/supervisor.py's job."""
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

from hmi.client import HMIClient, is_serving
from hmi.credentials import ADMIN_TOKEN_FILE, SERVICE_SECRET_FILE
from services.common.auth.peers import PeerSecurity
from services.common.auth.secret_files import ensure_secret_file
from services.common.model_specs import model_name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PortInUse(RuntimeError):
    """A port a service should listen on is taken: nothing was started."""


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def port_taken(address: str) -> bool:
    """True when something listens on (or holds) address HOST:PORT, as a server binding it would find."""
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC and uvicorn do: TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def serving_children(parent: int) -> dict[str, int]:
    """`KIND@ADDRESS` -> pid of every `hmi serve KIND --listen ADDRESS` process whose parent is `parent` (read
    from /proc, so it sees restarts the caller did not make: the restart benchmark and tests watch `hmi up`)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != parent or "serve" not in args or "--listen" not in args:
            continue
        found[f"{args[args.index('serve') + 1]}@{args[args.index('--listen') + 1]}"] = int(entry.name)
    return found


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
    metrics_port: int = 0
    started_at: float = 0.0
    restarts: int = 0


@dataclass(frozen=True)
class TlsFiles:
    """One certificate for every service of a local deployment (its names must cover the addresses used), the
    key, and the CA that signed it (peers verify each other with it: mutual TLS between the services)."""
    cert: Path
    key: Path
    ca: Path

    def args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


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
    auth: bool = True                    # False: every service with --auth off (tests of other things)
    tls: TlsFiles | None = None
    admin_token: str | None = None       # known once start() made or read it
    service_secret: str | None = None
    metrics_ports: dict[str, int] = field(default_factory=dict)    # service name -> its Prometheus port

    def __post_init__(self) -> None:
        for entry in self.model_entries()[1:]:
            self.other_compute.setdefault(model_name(entry), f"127.0.0.1:{free_port()}")

    @classmethod
    def on_free_ports(cls, data_dir: Path, computes: int = 1, metrics: bool = True, **kwargs) -> "ServiceSet":
        """Every service on a free loopback port (metrics too, unless `metrics` is False)."""
        kwargs.setdefault("http_addr", f"127.0.0.1:{free_port()}")
        services = cls(data_dir=data_dir, gateway_addr=f"127.0.0.1:{free_port()}",
                       store_addr=f"127.0.0.1:{free_port()}",
                       compute_addrs=[f"127.0.0.1:{free_port()}" for _ in range(computes)], **kwargs)
        if metrics and not services.metrics_ports:
            services.metrics_ports = {service.name: free_port() for service in services.plan()}
        return services

    def number_metrics_ports(self, base: int) -> None:
        """`hmi up --metrics-port BASE`: gateway BASE, store BASE+1, then each compute replica."""
        names = [s.name for s in self.plan()]
        order = ["gateway", "store"] + [n for n in names if n not in ("gateway", "store")]
        self.metrics_ports = {name: base + i for i, name in enumerate(order)}

    def ports_in_use(self) -> list[str]:
        """What is taken among the addresses and ports this set would listen on, each with its service."""
        wanted = [(s.name, s.address) for s in self.plan()]
        if self.http_addr.lower() != "off":
            wanted.append(("gateway HTTP", self.http_addr))
        host = lambda name: next(s.address for s in self.plan() if s.name == name).rpartition(":")[0]  # noqa: E731
        wanted += [(f"{name} metrics", f"{host(name)}:{port}") for name, port in self.metrics_ports.items()]
        seen: dict[str, str] = {}
        taken = []
        for name, address in wanted:
            if address in seen:
                taken.append(f"{address} ({name}) is also given to {seen[address]}")
                continue
            seen[address] = name
            if port_taken(address):
                taken.append(f"{address} ({name}) is already in use")
        return taken

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self.extra_env}

    @property
    def admin_token_file(self) -> Path | None:
        """Where the admin token is kept, None when HMI_ADMIN_TOKEN gives it (or auth is off)."""
        if not self.auth or self._env().get("HMI_ADMIN_TOKEN"):
            return None
        return self.data_dir / ADMIN_TOKEN_FILE

    @property
    def service_secret_file(self) -> Path | None:
        if not self.auth or self._env().get("HMI_SERVICE_SECRET"):
            return None
        return self.data_dir / SERVICE_SECRET_FILE

    def prepare_credentials(self) -> bool:
        """Makes (or reads) the admin token and the service secret; True when the admin token was made now."""
        if not self.auth:
            return False
        made = False
        if self.admin_token_file is not None:
            self.admin_token, made = ensure_secret_file(self.admin_token_file)
        else:
            self.admin_token = self._env()["HMI_ADMIN_TOKEN"].strip()
        if self.service_secret_file is not None:
            self.service_secret, _ = ensure_secret_file(self.service_secret_file)
        else:
            self.service_secret = self._env()["HMI_SERVICE_SECRET"].strip()
        return made

    def _security_args(self, service: str) -> list[str]:
        args = [] if self.auth else ["--auth", "off"]
        if self.service_secret_file is not None:
            args += ["--service-secret-file", str(self.service_secret_file)]
        if service == "gateway" and self.admin_token_file is not None:
            args += ["--admin-token-file", str(self.admin_token_file)]
        return args + (self.tls.args() if self.tls is not None else [])

    def peer_security(self) -> PeerSecurity:
        """What a process needs to call the store or compute directly, as the services do (tests, tools)."""
        tls = self.tls
        return PeerSecurity(service_secret=self.service_secret, auth=self.auth,
                            tls_cert=str(tls.cert) if tls else None, tls_key=str(tls.key) if tls else None,
                            tls_ca=str(tls.ca) if tls else None)

    def client(self, timeout: float = 60.0, **kwargs) -> HMIClient:
        """A client of the gateway with the admin credential (and the CA, with TLS)."""
        kwargs.setdefault("token", self.admin_token or "")
        kwargs.setdefault("tls_ca", str(self.tls.ca) if self.tls else "")
        return HMIClient(self.gateway_addr, timeout=timeout, **kwargs)

    def model_entries(self) -> list[str]:
        return [part.strip() for part in self.model.split(",") if part.strip()]

    def plan(self) -> list[Service]:
        entries = self.model_entries()
        every_model = [arg for entry in entries for arg in ("--model", entry)]
        services = [Service("store", self.store_addr, ["store", "--listen", self.store_addr,
                                                       "--data-dir", str(self.data_dir)] + every_model
                            + self._security_args("store"))]
        for index, address in enumerate(self.compute_addrs):
            services.append(Service(f"compute-{index}" if len(self.compute_addrs) > 1 else "compute", address,
                                    ["compute", "--listen", address, "--store", self.store_addr,
                                     "--model", entries[0]] + self._security_args("compute")))
        for entry in entries[1:]:
            name = model_name(entry)
            services.append(Service(f"compute-{name}", self.other_compute[name],
                                    ["compute", "--listen", self.other_compute[name], "--store", self.store_addr,
                                     "--model", entry] + self._security_args("compute")))
        routes = [f"{model_name(entries[0])}={','.join(self.compute_addrs)}"] + [
            f"{name}={address}" for name, address in self.other_compute.items()]
        services.append(Service("gateway", self.gateway_addr,
                                ["gateway", "--listen", self.gateway_addr, "--http", self.http_addr,
                                 "--store", self.store_addr]
                                + [arg for route in routes for arg in ("--compute", route)] + every_model
                                + self._security_args("gateway")))
        for service in services:
            port = self.metrics_ports.get(service.name, 0)
            if port:
                service.metrics_port = port
                service.args += ["--metrics-port", str(port)]
        return services

    def metrics_url(self, name: str) -> str:
        """http://HOST:PORT/metrics of a service started with a metrics port."""
        service = next(s for s in self.plan() if s.name == name)
        return f"http://{service.address.rpartition(':')[0]}:{service.metrics_port}/metrics"

    def start(self, timeout: float = 120.0, only: list[str] | None = None, later: list[str] | None = None) -> None:
        """Starts every planned service (or the named ones) and waits for each to be SERVING, except those named
        in `later` (started, not waited for: `wait_serving` them before use). Refuses (PortInUse, nothing
        started) when a port of a full start is taken."""
        if only is None:
            taken = self.ports_in_use()
            if taken:
                raise PortInUse("cannot start: " + "; ".join(taken) + ". Another HMI deployment or program "
                                "listens there: stop it, or give this one other addresses (HMI_GATEWAY_ADDR, "
                                "--http, --metrics-port)")
        self.prepare_credentials()
        planned = [s for s in self.plan() if only is None or s.name in only]
        for service in planned:
            self.spawn(service)
        for service in planned:
            if service.name not in (later or []):
                self._wait_serving(service, timeout)

    def wait_serving(self, name: str, timeout: float = 120.0) -> None:
        """Waits for a started service (one `start` left for `later`) to report SERVING."""
        self._wait_serving(next(s for s in self.services if s.name == name), timeout)

    def environment(self) -> dict[str, str]:
        # All services share this machine's cores: compute's torch takes half of them (measured on 2 cores:
        # 1 thread gave ~1.8x the throughput of torch's default, which oversubscribes the CPU).
        return {"HMI_TORCH_THREADS": str(max(1, (os.cpu_count() or 2) // 2)),
                "HMI_MODEL_CACHE": str(self.data_dir / "models"), **os.environ, **self.extra_env,
                "HMI_SUPERVISOR_PID": str(os.getpid())}

    def spawn(self, service: Service) -> None:
        """Starts (or starts again) one service's process; it dies with this process."""
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if service.log_file is None:
                service.log_file = open(self.log_dir / f"{service.name}.log", "ab")
            out = service.log_file
        service.process = subprocess.Popen(hmi_command() + ["serve"] + service.args, env=self.environment(),
                                           stdout=out, stderr=out, start_new_session=True)
        service.started_at = time.monotonic()
        known = next((s for s in self.services if s.name == service.name), None)
        if known is not None and known is not service:
            service.restarts = known.restarts
        self.services = [s for s in self.services if s.name != service.name] + [service]

    def _wait_serving(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with code {service.process.returncode} while starting"
                                   + (f"; see {self.log_dir / (service.name + '.log')}" if self.log_dir else ""))
            tls = self.tls
            if is_serving(service.address, timeout=0.5, tls_ca=str(tls.ca) if tls else None,
                          tls_cert=str(tls.cert) if tls else None, tls_key=str(tls.key) if tls else None):
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
