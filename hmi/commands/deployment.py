"""`hmi up` (every service as a local process) and `hmi serve SERVICE` (one, in the foreground)."""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from services.common.config import env, split_addresses

# Services write tenants' adapters, API-key verifiers and logs: nothing they create is readable by other
# local accounts (data dir 0700, files 0600).
PRIVATE_UMASK = 0o077


def cmd_serve(args) -> int:
    from services.common.server import die_with_supervisor
    die_with_supervisor()          # under `hmi up`: dies with it, before the seconds of model loading
    os.umask(PRIVATE_UMASK)
    if args.service == "store":
        from services.knowledge_store.server import main
    elif args.service == "compute":
        from services.compute.server import main
    else:
        from services.gateway.server import main
    main(args)
    return 0


def cmd_up(args) -> int:
    """Starts the deployment, prints `HMI is ready: ...`, restarts services that die, stops on Ctrl-C/SIGTERM.
    Store and compute take free loopback ports unless their addresses are given; a port that is taken is
    refused (naming it) before anything starts."""
    from hmi.launcher import PortInUse, ServiceSet, TlsFiles, free_port
    from hmi.supervisor import Supervisor
    os.umask(PRIVATE_UMASK)
    if args.tls_cert and not (args.tls_key and args.tls_ca):
        raise SystemExit("hmi up --tls-cert needs --tls-key and --tls-ca (the services verify each other with it)")
    store_addr = args.store_addr or f"127.0.0.1:{free_port()}"
    compute = split_addresses(args.compute_addrs)
    wanted = max(1, args.computes, len(compute))
    compute += [f"127.0.0.1:{free_port()}" for _ in range(wanted - len(compute))]
    extra_env = {name: value for name, value in (("HMI_LOG_FORMAT", args.log_format), ("HMI_TRACING", args.tracing))
                 if value}
    services = ServiceSet(data_dir=Path(args.data_dir), gateway_addr=args.gateway, store_addr=store_addr,
                          compute_addrs=compute, model=",".join(args.model) if args.model else env("HMI_MODEL"),
                          log_dir=Path(args.log_dir) if args.log_dir else None, http_addr=args.http,
                          extra_env=extra_env, auth=args.auth == "on",
                          tls=TlsFiles(Path(args.tls_cert), Path(args.tls_key), Path(args.tls_ca))
                          if args.tls_cert else None)
    if args.metrics_port:
        services.number_metrics_ports(args.metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        made = services.prepare_credentials()
        if services.admin_token_file is not None:
            print(f"admin token {'written to' if made else 'in'} {services.admin_token_file.resolve()} (mode 0600): "
                  f"the CLI on this machine uses it; elsewhere set HMI_TOKEN, or make API keys with `hmi key create`",
                  flush=True)
        elif not services.auth:
            print("warning: authentication is OFF (--auth off): anyone who reaches these ports may call every method",
                  file=sys.stderr, flush=True)
        services.start(timeout=args.start_timeout)
    except PortInUse as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        services.stop()
        return 1
    supervisor = Supervisor(services)
    try:
        others = "".join(f", {name} compute {address}" for name, address in services.other_compute.items())
        scheme = "https" if args.tls_cert else "http"
        http = f", http {scheme}://{args.http}" if args.http.lower() != "off" else ""
        metrics = (", metrics " + ",".join(f"{name}={port}" for name, port in services.metrics_ports.items())
                   if services.metrics_ports else "")
        print(f"HMI is ready: gateway {args.gateway}{http}, store {store_addr}, "
              f"compute {','.join(services.compute_addrs)}{others}{metrics}"
              f", data {Path(args.data_dir).resolve()} (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            supervisor.tick()
    finally:
        services.stop()
        print("HMI stopped", flush=True)
    return 0


def add_parsers(sub) -> None:
    up = sub.add_parser("up", help="start store, compute and gateway as local processes")
    up.add_argument("--gateway", default=env("HMI_GATEWAY_ADDR"), help="[HMI_GATEWAY_ADDR]")
    up.add_argument("--http", default=env("HMI_HTTP_ADDR"),
                    help="the gateway's HTTP front door (OpenAI-compatible API), HOST:PORT or 'off' [HMI_HTTP_ADDR]")
    up.add_argument("--store-addr", default=os.environ.get("HMI_STORE_ADDR", ""),
                    help="the store's address; default: a free loopback port [HMI_STORE_ADDR]")
    up.add_argument("--compute-addrs", default=os.environ.get("HMI_COMPUTE_ADDRS", ""),
                    help="comma-separated addresses of the compute replicas; default: free loopback ports "
                         "[HMI_COMPUTE_ADDRS]")
    up.add_argument("--computes", type=int, default=1, help="compute replicas to start")
    up.add_argument("--metrics-port", type=int, default=0,
                    help="BASE: Prometheus metrics of the gateway on BASE, the store on BASE+1, each compute replica "
                         "on BASE+2, BASE+3, ...; 0 = off")
    up.add_argument("--log-format", choices=("text", "json"), default=None,
                    help="every service's log format [HMI_LOG_FORMAT]")
    up.add_argument("--tracing", default=None, help="every service's OpenTelemetry exporter (see hmi serve gateway "
                                                     "--help) [HMI_TRACING]")
    up.add_argument("--data-dir", default=env("HMI_DATA_DIR"), help="[HMI_DATA_DIR]")
    up.add_argument("--model", action="append", default=None,
                    help="base model: NAME=DIR, minilm, smollm2 or a folder; repeat to host several (one compute "
                         "replica each; the first is the default and gets --computes replicas) [HMI_MODEL]")
    up.add_argument("--log-dir", default=None, help="write each service's log there instead of this terminal")
    up.add_argument("--start-timeout", type=float, default=180.0)
    up.add_argument("--auth", choices=("on", "off"), default=env("HMI_AUTH", "on"),
                    help="credentials required (default); 'off' only for tests and trusted networks [HMI_AUTH]")
    up.add_argument("--tls-cert", default=env("HMI_TLS_CERT", "") or None,
                    help="PEM certificate for every service (its names must cover the addresses) [HMI_TLS_CERT]")
    up.add_argument("--tls-key", default=env("HMI_TLS_KEY", "") or None, help="[HMI_TLS_KEY]")
    up.add_argument("--tls-ca", default=env("HMI_TLS_CA", "") or None,
                    help="the CA that signed it: clients verify the gateway with it, the services each other "
                         "(mutual TLS) [HMI_TLS_CA]")
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service in the foreground (what compose runs)")
    serve_sub = serve.add_subparsers(dest="service", required=True)
    from services.compute.server import add_arguments as compute_args
    from services.gateway.server import add_arguments as gateway_args
    from services.knowledge_store.server import add_arguments as store_args
    for name, add in (("store", store_args), ("compute", compute_args), ("gateway", gateway_args)):
        p = serve_sub.add_parser(name)
        add(p)
        p.set_defaults(func=cmd_serve)
