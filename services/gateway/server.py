"""Gateway process: `hmi serve gateway`."""
from __future__ import annotations

import argparse

from services.common.auth.flags import add_security_arguments, security_from_args
from services.common.config import add_observability_arguments, env, env_float, env_int, split_addresses
from services.gateway.settings import BatcherSettings, GenerationLimits

BATCHER, GENERATION = BatcherSettings(), GenerationLimits()     # every default written once, there


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=env("HMI_GATEWAY_ADDR"), help="address to listen on [HMI_GATEWAY_ADDR]")
    parser.add_argument("--http", default=env("HMI_HTTP_ADDR"),
                        help="HOST:PORT of the HTTP doors (OpenAI-compatible API, /v1/classify, KServe v2, TEI); "
                             "'off' = gRPC only [HMI_HTTP_ADDR]")
    parser.add_argument("--store", default=env("HMI_STORE_ADDR"), help="knowledge store address [HMI_STORE_ADDR]")
    parser.add_argument("--compute", action="append", default=None,
                        help="compute replicas: comma-separated targets of the default model's replicas, or "
                             "MODEL=TARGETS; repeat for each model. A target is HOST:PORT, dns:///NAME:PORT or "
                             "dns://DNS-SERVER/NAME:PORT; every address a name resolves to is one replica "
                             "[HMI_COMPUTE_ADDRS, ';'-separated]")
    parser.add_argument("--discovery-interval", type=float, default=env_float("HMI_DISCOVERY_INTERVAL", 5.0),
                        help="seconds between resolutions of the compute targets (also soon after a replica "
                             "fails) [HMI_DISCOVERY_INTERVAL]")
    parser.add_argument("--probe-interval", type=float, default=env_float("HMI_PROBE_INTERVAL", 1.0),
                        help="seconds between health probes of each compute replica and the store "
                             "[HMI_PROBE_INTERVAL]")
    parser.add_argument("--required-models", default=env("HMI_REQUIRED_MODELS", ""),
                        help="comma-separated models the gateway needs a reachable replica of to report SERVING "
                             "(default: every --model) [HMI_REQUIRED_MODELS]")
    parser.add_argument("--default-deadline", type=float, default=env_float("HMI_DEFAULT_DEADLINE", 30.0),
                        help="seconds a Classify or Embed call without a deadline may take [HMI_DEFAULT_DEADLINE]")
    parser.add_argument("--max-deadline", type=float, default=env_float("HMI_MAX_DEADLINE", 21600.0),
                        help="a caller's deadline is honoured up to this many seconds [HMI_MAX_DEADLINE]")
    parser.add_argument("--workers", type=int, default=env_int("HMI_GATEWAY_WORKERS", 128),
                        help="gRPC request threads; 8x as many calls may be in progress [HMI_GATEWAY_WORKERS]")
    parser.add_argument("--metrics-top-tenants", type=int, default=env_int("HMI_METRICS_TOP_TENANTS", 20),
                        help="tenants with a metrics label of their own (the busiest; others count as _other) "
                             "[HMI_METRICS_TOP_TENANTS]")
    parser.add_argument("--model", action="append", default=None,
                        help="base models served (for their tokenizers): NAME=DIR, minilm, smollm2 or a folder; "
                             "repeat for several, the first is the default [HMI_MODEL, comma-separated]")
    parser.add_argument("--max-batch-tokens", type=int,
                        default=env_int("HMI_MAX_BATCH_TOKENS", BATCHER.max_batch_tokens))
    parser.add_argument("--max-batch-tenants", type=int,
                        default=env_int("HMI_MAX_BATCH_TENANTS", BATCHER.max_batch_tenants),
                        help="distinct adapters per batch; keep below compute's slots / in-flight batches")
    parser.add_argument("--max-wait-ms", type=float,
                        default=env_float("HMI_MAX_WAIT_MS", BATCHER.max_wait_ms))
    parser.add_argument("--max-queue", type=int,
                        default=env_int("HMI_MAX_QUEUE", BATCHER.max_queue),
                        help="sequences waiting; a request that does not fit whole is refused with "
                             "RESOURCE_EXHAUSTED [HMI_MAX_QUEUE]")
    parser.add_argument("--max-queue-tokens", type=int,
                        default=env_int("HMI_MAX_QUEUE_TOKENS", BATCHER.max_queue_tokens),
                        help="tokens waiting: admission costs a request's tokens [HMI_MAX_QUEUE_TOKENS]")
    parser.add_argument("--max-sequence-tokens", type=int, default=env_int("HMI_MAX_SEQUENCE_TOKENS", 256))
    parser.add_argument("--max-texts", type=int, default=env_int("HMI_MAX_TEXTS", 256), help="texts per request")
    parser.add_argument("--max-text-chars", type=int, default=env_int("HMI_MAX_TEXT_CHARS", 0),
                        help="characters per text, checked before tokenising (with truncate: cut to this); "
                             "0 = 16 x --max-sequence-tokens [HMI_MAX_TEXT_CHARS]")
    parser.add_argument("--max-http-body-mib", type=float, default=env_float("HMI_MAX_HTTP_BODY_MIB", 4.0),
                        help="largest HTTP request body, checked while it is read (413 past it) "
                             "[HMI_MAX_HTTP_BODY_MIB]")
    parser.add_argument("--max-request-chars", type=int, default=env_int("HMI_MAX_REQUEST_CHARS", 262144),
                        help="characters of all texts of one request [HMI_MAX_REQUEST_CHARS]")
    parser.add_argument("--inflight-per-compute", type=int, default=env_int("HMI_INFLIGHT_PER_COMPUTE", 3),
                        help="batches in flight per compute replica: enough that one prepares while the replica's "
                             "execution threads run theirs [HMI_INFLIGHT_PER_COMPUTE]")
    parser.add_argument("--tenant-cache-ttl", type=float, default=env_float("HMI_TENANT_CACHE_TTL", 2.0),
                        help="seconds a cached tenant record lives while the store's change log cannot be read "
                             "[HMI_TENANT_CACHE_TTL]")
    parser.add_argument("--stale-if-unreachable", type=float, default=env_float("HMI_STALE_IF_UNREACHABLE", 600.0),
                        help="seconds after its fetch a cached tenant record is still served while the store cannot "
                             "be reached at all (a store that is down takes no writes); 0 = fail at once "
                             "[HMI_STALE_IF_UNREACHABLE]")
    parser.add_argument("--preload-tenants", type=int, default=env_int("HMI_PRELOAD_TENANTS", 100_000),
                        help="tenant records read from the store at start, so that no tenant's first request waits "
                             "for a lookup (0: none; about 1 KiB each) [HMI_PRELOAD_TENANTS]")
    parser.add_argument("--change-poll-ms", type=float, default=env_float("HMI_CHANGE_POLL_MS", 500.0),
                        help="how often the store's change log is read; tenant records are cached until they change, "
                             "so changes made through another gateway show up within this [HMI_CHANGE_POLL_MS]")
    parser.add_argument("--max-new-tokens", type=int,
                        default=env_int("HMI_MAX_NEW_TOKENS", GENERATION.max_new_tokens),
                        help="decoder models: the largest max_new_tokens a request may ask [HMI_MAX_NEW_TOKENS]")
    parser.add_argument("--max-prompt-tokens", type=int,
                        default=env_int("HMI_MAX_PROMPT_TOKENS", GENERATION.max_prompt_tokens),
                        help="decoder models: the longest prompt [HMI_MAX_PROMPT_TOKENS]")
    parser.add_argument("--max-queue-per-tenant", type=int,
                        default=env_int("HMI_MAX_QUEUE_PER_TENANT", BATCHER.max_queue_per_tenant),
                        help="sequences one tenant may have waiting unless its limits say otherwise (max_queued); "
                             "past it RESOURCE_EXHAUSTED [HMI_MAX_QUEUE_PER_TENANT]")
    parser.add_argument("--default-tenant-rps", type=float, default=env_float("HMI_DEFAULT_TENANT_RPS", 0.0),
                        help="requests/s of a tenant without its own limit; 0 = none [HMI_DEFAULT_TENANT_RPS]")
    parser.add_argument("--default-tenant-tps", type=float, default=env_float("HMI_DEFAULT_TENANT_TPS", 0.0),
                        help="tokens/s of a tenant without its own limit; 0 = none [HMI_DEFAULT_TENANT_TPS]")
    parser.add_argument("--default-tenant-max-concurrent", type=int,
                        default=env_int("HMI_DEFAULT_TENANT_MAX_CONCURRENT", 0),
                        help="requests in flight of a tenant without its own limit; 0 = none "
                             "[HMI_DEFAULT_TENANT_MAX_CONCURRENT]")
    parser.add_argument("--share-limits-interval", type=float, default=env_float("HMI_SHARE_LIMITS_INTERVAL", 1.0),
                        help="seconds between reports of this gateway's demand per tenant to the store, which "
                             "splits every tenant's limits over the gateways by demand; 0 = off: each gateway "
                             "applies the whole limits [HMI_SHARE_LIMITS_INTERVAL]")
    parser.add_argument("--admin-token-file", default=env("HMI_ADMIN_TOKEN_FILE", "") or None,
                        help="file holding the admin credential (or the variable HMI_ADMIN_TOKEN); `hmi up` makes "
                             "HMI_DATA_DIR/admin.token [HMI_ADMIN_TOKEN_FILE]")
    add_observability_arguments(parser, "gateway")
    add_security_arguments(parser)


def compute_targets(values: list[str], models: list[str]) -> dict[str, list[str]]:
    """`ADDRS` (the default model's replicas) or `MODEL=ADDRS`, per value -> model -> addresses."""
    targets: dict[str, list[str]] = {}
    for value in values:
        model, _, addresses = value.rpartition("=") if "=" in value else ("", "", value)
        model = model or models[0]
        if model not in models:
            raise SystemExit(f"--compute {value!r} names model {model!r}, which is not among --model {models}")
        targets.setdefault(model, []).extend(split_addresses(addresses))
    missing = [m for m in models if not targets.get(m)]
    if missing:
        raise SystemExit(f"no compute replicas for model(s) {missing}: add --compute MODEL=ADDRESS for each")
    return targets


def main(args: argparse.Namespace) -> None:
    # Heavy imports (torch, transformers) only when the service really starts: keeps the CLI fast.
    from hmi_client.v1 import fine_tuning_pb2_grpc as ft_grpc
    from hmi_client.v1 import gateway_pb2_grpc as pb_grpc
    from hmi_proto.v1 import knowledge_store_pb2_grpc as store_grpc
    from models.dims import ModelDims
    from models.loading import eos_token_ids
    from services.common.auth.peers import describe
    from services.common.auth.secret_files import read_secret
    from services.common.logs import setup_logging
    from services.common.metrics import register_state
    from services.common.model_specs import parse_model_specs
    from services.common.rpc import channel, set_max_deadline
    from services.common.server import start_server, wait_for_termination
    from services.common.tracing import setup_tracing
    from services.gateway import metrics
    from services.gateway.access import Access
    from services.gateway.batcher import Batcher
    from services.gateway.core.admin import Admin
    from services.gateway.core.chat import ChatTemplates
    from services.gateway.core.fine_tuning import FineTuning
    from services.gateway.core.inference import Inference
    from services.gateway.core.lanes import DecoderLane, EncoderLane, Lane
    from services.gateway.directory import TenantDirectory
    from services.gateway.key_ring import KeyRing
    from services.gateway.quotas import Limits, Quotas
    from services.gateway.readiness import Readiness
    from services.gateway.router import Router
    from services.gateway.servicer import AdminServicer, FineTuningServicer, GatewayServicer
    from services.gateway.tokenizer import TextEncoder
    log = setup_logging("gateway", args.log_format)
    setup_tracing("gateway", args.tracing)
    security = security_from_args(args, "gateway")
    admin_token = read_secret("HMI_ADMIN_TOKEN", args.admin_token_file, "admin token")
    if security.auth and not admin_token:
        raise SystemExit("gateway: authentication is on, so it needs the admin credential: give --admin-token-file "
                         "FILE or HMI_ADMIN_TOKEN (`hmi up` makes HMI_DATA_DIR/admin.token), or --auth off")
    models = parse_model_specs(args.model or env("HMI_MODEL"))
    targets = compute_targets(args.compute or [v for v in (env("HMI_COMPUTE_ADDRS") or "").split(";") if v],
                              [m.name for m in models])
    required = split_addresses(args.required_models) or [m.name for m in models]
    unknown = [m for m in required if m not in targets]
    if unknown:
        raise SystemExit(f"--required-models names {unknown}, which are not among --model {list(targets)}")
    if not 0 <= args.preload_tenants <= 10_000_000:
        raise SystemExit("--preload-tenants must be 0 (none) to 10,000,000")
    if args.change_poll_ms <= 0 or args.tenant_cache_ttl < 0:
        raise SystemExit("--change-poll-ms must be > 0 and --tenant-cache-ttl >= 0")
    if not 0 <= args.share_limits_interval <= 60:
        raise SystemExit("--share-limits-interval must be 0 (off) to 60 seconds")
    if min(args.default_deadline, args.max_deadline, args.probe_interval, args.discovery_interval) <= 0:
        raise SystemExit("--default-deadline, --max-deadline, --probe-interval and --discovery-interval must be > 0")
    set_max_deadline(args.max_deadline)
    metrics.configure(args.metrics_top_tenants)
    store_channel = channel(args.store, security=security)
    store = store_grpc.KnowledgeStoreStub(store_channel)
    directory = TenantDirectory(store, ttl_seconds=args.tenant_cache_ttl, poll_seconds=args.change_poll_ms / 1e3,
                                stale_if_unreachable=args.stale_if_unreachable, preload=args.preload_tenants,
                                feed=store_grpc.KnowledgeStoreStub(channel(args.store, own_connection=True,
                                                                           security=security)))
    keys = KeyRing(store, directory.fresh, stale_if_unreachable=args.stale_if_unreachable)
    directory.listeners.append(lambda kind, name: keys.forget_all() if kind is None
                               else keys.forget(name) if kind == "key" else None)
    access = Access(enabled=security.auth, admin_token=admin_token, keys=keys)
    quotas = Quotas(Limits(rps=args.default_tenant_rps, tps=args.default_tenant_tps,
                           max_concurrent=args.default_tenant_max_concurrent))
    directory.start()
    sharing = None
    if args.share_limits_interval > 0:
        from services.gateway.limit_sharing import LimitSharing
        sharing = LimitSharing(quotas, store, directory.follower_id, interval=args.share_limits_interval)
        sharing.start()
    lanes: dict[str, Lane] = {}
    for spec in models:
        dims = ModelDims.from_dir(spec.directory)
        max_sequence_tokens = args.max_sequence_tokens
        if dims.is_decoder:   # decoders refuse Classify anyway; the limit only has to be valid
            max_sequence_tokens = min(max_sequence_tokens, dims.max_positions)
        if max_sequence_tokens > dims.max_positions:
            raise SystemExit(f"--max-sequence-tokens {args.max_sequence_tokens} exceeds model {spec.name!r}'s "
                             f"{dims.max_positions} positions")
        try:
            router = Router(targets[spec.name], inflight_per_replica=args.inflight_per_compute, model=spec.name,
                            discovery_interval=args.discovery_interval, probe_interval=args.probe_interval,
                            security=security)
        except ValueError as error:
            raise SystemExit(f"--compute for model {spec.name!r}: {error}") from None
        encoder = TextEncoder(spec.directory, max_sequence_tokens=max_sequence_tokens, max_texts=args.max_texts,
                              max_text_chars=args.max_text_chars, max_request_chars=args.max_request_chars)
        if dims.is_decoder:
            lanes[spec.name] = DecoderLane(spec.name, encoder, router,
                                           GenerationLimits(max_new_tokens=args.max_new_tokens,
                                                            max_prompt_tokens=args.max_prompt_tokens),
                                           dims.max_positions, eos_token_ids(spec.directory))
            continue
        batcher = Batcher(router, BatcherSettings(max_batch_tokens=args.max_batch_tokens,
                                                  max_batch_tenants=args.max_batch_tenants,
                                                  max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                                                  max_queue_tokens=args.max_queue_tokens,
                                                  max_queue_per_tenant=args.max_queue_per_tenant))
        lanes[spec.name] = EncoderLane(spec.name, encoder, batcher, router)

    model_dirs = {m.name: m.directory for m in models}
    chat = ChatTemplates(model_dirs, {name: lane.tokenizer for name, lane in lanes.items()
                                      if isinstance(lane, DecoderLane)})
    inference = Inference(lanes, directory, default_timeout=args.default_deadline, access=access, quotas=quotas,
                          chat=chat)
    administration = Admin(store, directory, access=access)
    gateway = GatewayServicer(inference)
    admin = AdminServicer(administration)
    tuning = FineTuning(store, access=access)
    register_state(lambda: metrics.lane_state(lanes))

    def register(server):
        pb_grpc.add_GatewayServicer_to_server(gateway, server)
        pb_grpc.add_AdminServicer_to_server(admin, server)
        ft_grpc.add_FineTuningServicer_to_server(FineTuningServicer(tuning), server)

    running = start_server(args.listen, register, ["hmi.v1.Gateway", "hmi.v1.Admin", "hmi.v1.FineTuning"],
                           workers=args.workers,
                           metrics_port=args.metrics_port, security=security, reflection_on=args.reflection,
                           metrics_host=args.metrics_host,
                           metrics_tenant_labels=args.metrics_tenant_labels)
    for lane in lanes.values():
        lane.router.start()
    readiness = Readiness(running.health, store_channel, {name: lane.router for name, lane in lanes.items()},
                          required, interval=args.probe_interval)
    readiness.start()
    http = None
    if args.http and args.http.lower() != "off":
        # The HTTP doors call the same core as the gRPC servicers (services/gateway/http).
        from services.gateway.http.app import create_app
        from services.gateway.http.auth import checked_by
        from services.gateway.http.door import Door
        from services.gateway.http.server import HttpServer
        http = HttpServer(create_app(Door(inference, administration, model_dirs, ready=readiness.ready,
                                          fine_tuning=tuning),
                                     checked_by(access.principal_of),
                                     max_body_bytes=max(1, int(args.max_http_body_mib * 2**20))), args.http,
                          tls_cert=security.tls_cert, tls_key=security.tls_key)
        http.start()
    scheme = "https" if security.tls else "http"
    log.info("gateway listening on %s%s (store %s; %s; batches <= %d tokens / %d tenants, wait <= %.1f ms; %s); %s",
             args.listen, f" and {scheme}://{args.http}" if http else "", args.store,
             "; ".join(f"{name}: compute {lane.router.describe()}" for name, lane in lanes.items()),
             args.max_batch_tokens, args.max_batch_tenants, args.max_wait_ms, describe(security, internal=False),
             "ready" if readiness.ready() else "not ready yet: " + "; ".join(readiness.problems))

    def stop():
        readiness.close()
        if http is not None:
            http.stop()
        directory.close()
        if sharing is not None:
            sharing.close()
        for lane in lanes.values():
            if isinstance(lane, EncoderLane):
                lane.batcher.close()
            lane.router.close()

    wait_for_termination(running, log, on_stop=stop)
