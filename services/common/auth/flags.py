"""The security flags every service takes (`hmi serve store|compute|gateway`), with environment defaults."""
from __future__ import annotations

import argparse
import logging

from services.common.auth.peers import PeerSecurity
from services.common.auth.secret_files import read_secret
from services.common.config import env

log = logging.getLogger("hmi.auth")


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--auth", choices=("on", "off"), default=env("HMI_AUTH", "on"),
                        help="check credentials: API keys or the admin token at the gateway, the service secret at "
                             "the store and compute; 'off' only for tests and trusted networks [HMI_AUTH]")
    parser.add_argument("--service-secret-file", default=env("HMI_SERVICE_SECRET_FILE", "") or None,
                        help="file holding the secret the services share (or the variable HMI_SERVICE_SECRET); "
                             "`hmi up` makes one in the data dir [HMI_SERVICE_SECRET_FILE]")
    parser.add_argument("--tls-cert", default=env("HMI_TLS_CERT", "") or None,
                        help="PEM certificate: serve TLS on this port (and show it to peers for mutual TLS) "
                             "[HMI_TLS_CERT]")
    parser.add_argument("--tls-key", default=env("HMI_TLS_KEY", "") or None, help="its private key [HMI_TLS_KEY]")
    parser.add_argument("--tls-ca", default=env("HMI_TLS_CA", "") or None,
                        help="PEM CA of the deployment: reach the other services over TLS, verified by it; the store "
                             "and compute then also require client certificates it signed (mutual TLS) [HMI_TLS_CA]")
    parser.add_argument("--reflection", action="store_true", default=env("HMI_REFLECTION", "") in ("1", "on", "true"),
                        help="serve gRPC reflection (lists the API to anyone who reaches the port) [HMI_REFLECTION]")
    parser.add_argument("--metrics-host", default=env("HMI_METRICS_HOST", "") or None,
                        help="interface of --metrics-port; default: the one --listen names [HMI_METRICS_HOST]")


def security_from_args(args: argparse.Namespace, service: str) -> PeerSecurity:
    """The process's credentials; exits with a message when auth is on and the service secret is missing."""
    auth = args.auth == "on"
    secret = read_secret("HMI_SERVICE_SECRET", args.service_secret_file, "service secret")
    if auth and not secret:
        raise SystemExit(f"{service}: authentication is on, so the services need a shared secret: give "
                         f"--service-secret-file FILE (or HMI_SERVICE_SECRET; `hmi up` makes one), or --auth off on "
                         f"a trusted network")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit(f"{service}: --tls-cert and --tls-key go together")
    if not auth:
        log.warning("%s: AUTHENTICATION IS OFF (--auth off): anyone who reaches this port may call every method; "
                    "use this only for tests or on a trusted network", service)
    return PeerSecurity(service_secret=secret if auth else None, tls_cert=args.tls_cert, tls_key=args.tls_key,
                        tls_ca=args.tls_ca, auth=auth)
