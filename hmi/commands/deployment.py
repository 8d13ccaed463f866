"""`hmi up` (every service as a local process) and `hmi serve SERVICE` (one, in the foreground)."""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from services.common.config import env, split_addresses


def cmd_serve(args) -> int:
    if args.service == "store":
        from services.knowledge_store.server import main
    elif args.service == "compute":
        from services.compute.server import main
    else:
        from services.gateway.server import main
    main(args)
    return 0


def cmd_up(args) -> int:
    from hmi.launcher import ServiceSet
    host = args.gateway.rsplit(":", 1)[0]
    compute = split_addresses(args.compute_addrs)
    if args.computes > len(compute):
        base = int(compute[-1].rsplit(":", 1)[1]) if compute else 50053
        compute += [f"{host}:{base + i}" for i in range(1, args.computes - len(compute) + 1)]
    services = ServiceSet(data_dir=Path(args.data_dir), gateway_addr=args.gateway, store_addr=args.store_addr,
                          compute_addrs=compute[:max(1, args.computes)],
                          model=",".join(args.model) if args.model else env("HMI_MODEL"),
                          log_dir=Path(args.log_dir) if args.log_dir else None, http_addr=args.http)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        services.start(timeout=args.start_timeout)
        others = "".join(f", {name} compute {address}" for name, address in services.other_compute.items())
        http = f", http http://{args.http}" if args.http.lower() != "off" else ""
        print(f"HMI is ready: gateway {args.gateway}{http}, store {args.store_addr}, "
              f"compute {','.join(services.compute_addrs)}{others}"
              f", data {Path(args.data_dir).resolve()} (Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            if len(services.running()) < len(services.services):
                print(f"a service exited; stopping the rest (running: {services.running()})", file=sys.stderr)
                return 1
    finally:
        services.stop()
        print("HMI stopped", flush=True)
    return 0


def add_parsers(sub) -> None:
    up = sub.add_parser("up", help="start store, compute and gateway as local processes")
    up.add_argument("--gateway", default=env("HMI_GATEWAY_ADDR"), help="[HMI_GATEWAY_ADDR]")
    up.add_argument("--http", default=env("HMI_HTTP_ADDR"),
                    help="the gateway's HTTP front door (OpenAI-compatible API), HOST:PORT or 'off' [HMI_HTTP_ADDR]")
    up.add_argument("--store-addr", default=env("HMI_STORE_ADDR"), help="[HMI_STORE_ADDR]")
    up.add_argument("--compute-addrs", default=env("HMI_COMPUTE_ADDRS"), help="[HMI_COMPUTE_ADDRS]")
    up.add_argument("--computes", type=int, default=1, help="compute replicas to start")
    up.add_argument("--data-dir", default=env("HMI_DATA_DIR"), help="[HMI_DATA_DIR]")
    up.add_argument("--model", action="append", default=None,
                    help="base model: NAME=DIR, minilm, smollm2 or a folder; repeat to host several (one compute "
                         "replica each; the first is the default and gets --computes replicas) [HMI_MODEL]")
    up.add_argument("--log-dir", default=None, help="write each service's log there instead of this terminal")
    up.add_argument("--start-timeout", type=float, default=180.0)
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
