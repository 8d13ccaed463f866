"""`hmi health` (for health checks), `hmi demo` and `hmi bench`."""
from __future__ import annotations


def cmd_health(args) -> int:
    from hmi.client import is_serving
    serving = is_serving(args.address, timeout=args.timeout, service=args.service, tls_ca=args.tls_ca,
                         tls_cert=args.tls_cert, tls_key=args.tls_key)
    name = f"{args.address} {args.service}" if args.service else args.address
    print(f"{name}: {'SERVING' if serving else 'NOT SERVING'}")
    return 0 if serving else 1


def cmd_demo(args) -> int:
    from hmi.demo import run_demo
    return run_demo(args)


def cmd_bench(args) -> int:
    from hmi.bench.runner import run_bench
    return run_bench(args)


def add_parsers(sub) -> None:
    health = sub.add_parser("health", help="exit 0 when the service at ADDRESS reports SERVING (health checks)")
    health.add_argument("address")
    health.add_argument("--timeout", type=float, default=3.0)
    from services.common.config import env
    health.add_argument("--tls-ca", default=env("HMI_TLS_CA", "") or None,
                        help="the service serves TLS: verify it with this CA [HMI_TLS_CA]")
    health.add_argument("--tls-cert", default=env("HMI_TLS_CERT", "") or None,
                        help="client certificate, for a store or compute that requires one (mutual TLS) "
                             "[HMI_TLS_CERT]")
    health.add_argument("--tls-key", default=env("HMI_TLS_KEY", "") or None, help="[HMI_TLS_KEY]")
    health.add_argument("--service", default="", help="a name on the health service: liveness, hmi.v1.Gateway, "
                        "hmi.v1.Admin, hmi.v1.Compute, hmi.v1.KnowledgeStore; default: the whole server")
    health.set_defaults(func=cmd_health)

    demo = sub.add_parser("demo", help="start everything, build a domain, register tenants, send traffic, stop")
    demo.add_argument("--tenants", type=int, default=300)
    demo.add_argument("--requests", type=int, default=600)
    demo.add_argument("--clients", type=int, default=16)
    demo.add_argument("--data-dir", default=None, help="default: a fresh temporary folder")
    demo.add_argument("--no-trained", dest="trained", action="store_false",
                      help="skip training the real tenants (they need ../shared/datasets)")
    demo.add_argument("--train-examples", type=int, default=1500)
    demo.add_argument("--corpus-lines", type=int, default=3000,
                      help="training texts each trained domain's PLOT is built from (the abstracts' domain: 30 %%)")
    demo.add_argument("--bridge-steps", type=int, default=300,
                      help="distillation steps of each domain's bridge (fewer than a default build, for time)")
    demo.add_argument("--no-generate", dest="generate", action="store_false",
                      help="skip the generative SmolLM2 tenants")
    demo.add_argument("--new-tokens", type=int, default=32, help="tokens each generative tenant writes")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="naive per-tenant models vs PEFT multi-adapter vs HMI, same workload")
    from hmi.bench.runner import add_arguments as bench_args
    bench_args(bench)
    bench.set_defaults(func=cmd_bench)
