"""Replica discovery: one name stands for every replica behind it.

A target is `HOST:PORT` (a name or an address), `dns:///NAME:PORT` (gRPC's spelling, the system resolver) or
`dns://SERVER[:PORT]/NAME:PORT` (asking that DNS server). A name resolves to every address behind it (a
Kubernetes headless Service or a compose service scaled to N answers one address per replica), and each
address is a replica of its own: the gateway routes to, limits and health-checks each one. gRPC's own `dns:`
resolution would balance round robin over them without telling the caller which is which, and never look
again when replicas come or go; `Discovery` resolves again every `interval` seconds and whenever asked (a
replica failed), at most every `min_interval`.

Where a name has both IPv4 and IPv6 addresses (dual-stack clusters, `localhost`), only the IPv4 ones are used:
the same replica must not count twice. A name that does not exist resolves to no replica; a resolver that
does not answer (timeout, server down) keeps the addresses known before, so a DNS outage removes nothing.
`Resolver` is injectable (tests use a DNS server of their own on loopback, or a function).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("hmi.discovery")


@dataclass(frozen=True)
class Target:
    text: str                              # as given
    host: str                              # name or address, without brackets
    port: int
    dns_server: tuple[str, int] | None = None

    @property
    def is_address(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False


class ResolverUnavailable(Exception):
    """The resolver did not answer: keep what was known."""


Resolver = Callable[[Target], list[str]]   # -> "HOST:PORT" addresses ([v6]:port for IPv6)


def parse_target(text: str) -> Target:
    value = text.strip()
    server = None
    if value.startswith("ipv4:") or value.startswith("ipv6:"):
        value = value[5:]
    elif value.startswith("dns:"):
        rest = value[4:]
        if rest.startswith("//"):
            authority, _, value = rest[2:].partition("/")
            if authority:
                server_host, server_port = _split(authority, default_port=53)
                server = (server_host, server_port)
        else:
            value = rest
    host, port = _split(value)
    if not host:
        raise ValueError(f"{text!r}: give HOST:PORT, dns:///NAME:PORT or dns://SERVER/NAME:PORT")
    return Target(text, host, port, server)


def _split(value: str, default_port: int | None = None) -> tuple[str, int]:
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    elif value.count(":") == 0:
        host, port = value, ""
    else:                                   # a bare IPv6 address
        host, port = value, ""
    if not port:
        if default_port is None:
            raise ValueError(f"{value!r} has no port: give HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: the port must be a number in 1..65535")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _one_family(hosts: list[str]) -> list[str]:
    v4 = [h for h in hosts if ":" not in h]
    return sorted(set(v4 or hosts))


def system_resolver(target: Target) -> list[str]:
    """getaddrinfo: /etc/hosts, the system's DNS servers and search domains (Kubernetes, compose)."""
    if target.is_address:
        return [join_address(target.host, target.port)]
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise ResolverUnavailable(f"{target.host}: {error}") from None
    hosts = _one_family([info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)])
    return [join_address(host, target.port) for host in hosts]


def dns_server_resolver(target: Target, timeout: float = 2.0) -> list[str]:
    """Asks the target's own DNS server (dns://SERVER/NAME:PORT) for A records, else AAAA."""
    import dns.exception
    import dns.resolver
    assert target.dns_server is not None
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [target.dns_server[0]]
    resolver.port = target.dns_server[1]
    resolver.lifetime = timeout
    hosts: list[str] = []
    try:
        for kind in ("A", "AAAA"):
            try:
                answer = resolver.resolve(target.host, kind, search=False)
            except dns.resolver.NoAnswer:
                continue
            hosts = [record.to_text() for record in answer]
            if hosts:
                break
    except dns.resolver.NXDOMAIN:
        return []
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as error:
        raise ResolverUnavailable(f"{target.host} at {target.dns_server}: {error}") from None
    return [join_address(host, target.port) for host in _one_family(hosts)]


def default_resolver(target: Target) -> list[str]:
    if target.dns_server is not None and not target.is_address:
        return dns_server_resolver(target)
    return system_resolver(target)


class Discovery:
    """The addresses behind a list of targets, resolved again when due or asked."""

    def __init__(self, targets: list[str], resolver: Resolver | None = None, *, interval: float = 5.0,
                 min_interval: float = 0.5) -> None:
        if not targets:
            raise ValueError("at least one compute address is needed (HMI_COMPUTE_ADDRS)")
        self.targets = [parse_target(t) for t in targets]
        self.resolver = resolver or default_resolver
        self.interval = interval
        self.min_interval = min_interval
        self._known: dict[str, list[str]] = {}
        self._names: dict[str, str] = {}          # address -> NAME:PORT it was found behind
        self._resolved_at = float("-inf")
        self._wanted = False
        self._lock = threading.Lock()

    def static(self) -> bool:
        """Every target is an address: nothing to resolve again."""
        return all(t.is_address for t in self.targets)

    def request(self) -> None:
        """Asks for a resolution at the next `due()` (a replica failed: maybe it is gone)."""
        self._wanted = True

    def due(self, soon: bool = False) -> bool:
        """Time to resolve again: `interval` passed, or `min_interval` since a request (or with `soon`)."""
        elapsed = time.monotonic() - self._resolved_at
        return elapsed >= self.interval or ((self._wanted or soon) and elapsed >= self.min_interval)

    def resolve(self) -> list[str]:
        """Every address behind the targets, in a stable order; a target whose resolver did not answer keeps
        its addresses known before."""
        with self._lock:
            self._wanted = False
            self._resolved_at = time.monotonic()
            addresses: list[str] = []
            for target in self.targets:
                try:
                    found = self.resolver(target)
                    if found != self._known.get(target.text):
                        log.info("%s resolves to %s", target.text, ", ".join(found) or "nothing")
                    self._known[target.text] = found
                except ResolverUnavailable as error:
                    log.warning("cannot resolve %s now (%s); keeping %s", target.text, error,
                                ", ".join(self._known.get(target.text, [])) or "nothing")
                    found = self._known.get(target.text, [])
                if not target.is_address:
                    self._names.update((a, join_address(target.host, target.port)) for a in found)
                addresses.extend(a for a in found if a not in addresses)
            return addresses

    def authority(self, address: str) -> str | None:
        """The NAME:PORT `address` was found behind (what TLS checks the peer's certificate against); None for a
        target given as an address."""
        with self._lock:
            return self._names.get(address)

    def describe(self) -> str:
        return ", ".join(t.text for t in self.targets)
