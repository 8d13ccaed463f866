"""Gateway process: `hmi serve gateway`."""
from __future__ import annotations

import argparse

from services.common.config import env, env_float, env_int, split_addresses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=env("HMI_GATEWAY_ADDR"), help="address to listen on [HMI_GATEWAY_ADDR]")
    parser.add_argument("--store", default=env("HMI_STORE_ADDR"), help="knowledge store address [HMI_STORE_ADDR]")
    parser.add_argument("--compute", default=env("HMI_COMPUTE_ADDRS"),
                        help="comma-separated compute addresses [HMI_COMPUTE_ADDRS]")
    parser.add_argument("--model", default=env("HMI_MODEL"), help="base model (for its tokenizer) [HMI_MODEL]")
    parser.add_argument("--max-batch-tokens", type=int, default=env_int("HMI_MAX_BATCH_TOKENS", 8192))
    parser.add_argument("--max-batch-tenants", type=int, default=env_int("HMI_MAX_BATCH_TENANTS", 32),
                        help="distinct adapters per batch; keep below compute's slots / in-flight batches")
    parser.add_argument("--max-wait-ms", type=float, default=env_float("HMI_MAX_WAIT_MS", 5.0))
    parser.add_argument("--max-queue", type=int, default=env_int("HMI_MAX_QUEUE", 4096),
                        help="sequences waiting before RESOURCE_EXHAUSTED [HMI_MAX_QUEUE]")
    parser.add_argument("--max-sequence-tokens", type=int, default=env_int("HMI_MAX_SEQUENCE_TOKENS", 256))
    parser.add_argument("--max-texts", type=int, default=env_int("HMI_MAX_TEXTS", 256), help="texts per request")
    parser.add_argument("--inflight-per-compute", type=int, default=env_int("HMI_INFLIGHT_PER_COMPUTE", 3),
                        help="batches in flight per compute replica: enough that one prepares while the replica's "
                             "execution threads run theirs [HMI_INFLIGHT_PER_COMPUTE]")
    parser.add_argument("--tenant-cache-ttl", type=float, default=env_float("HMI_TENANT_CACHE_TTL", 2.0))
    parser.add_argument("--max-new-tokens", type=int, default=env_int("HMI_MAX_NEW_TOKENS", 1024),
                        help="decoder models: the largest max_new_tokens a request may ask [HMI_MAX_NEW_TOKENS]")
    parser.add_argument("--max-prompt-tokens", type=int, default=env_int("HMI_MAX_PROMPT_TOKENS", 2048),
                        help="decoder models: the longest prompt [HMI_MAX_PROMPT_TOKENS]")
    parser.add_argument("--metrics-port", type=int, default=env_int("HMI_GATEWAY_METRICS_PORT", 0))


def main(args: argparse.Namespace) -> None:
    # Heavy imports (torch, transformers) only when the service really starts: keeps the CLI fast.
    from hmi.v1 import gateway_pb2_grpc as pb_grpc
    from hmi.v1 import knowledge_store_pb2_grpc as store_grpc
    from services.common.logs import setup_logging
    from services.common.models import ModelDims, eos_token_ids, load_tokenizer, resolve_model_dir
    from services.common.rpc import channel
    from services.common.server import start_server, wait_for_termination
    from services.gateway.batcher import Batcher, BatcherSettings
    from services.gateway.directory import TenantDirectory
    from services.gateway.router import Router
    from services.gateway.generation import GenerationLimits
    from services.gateway.servicer import AdminServicer, GatewayServicer, GenerationSupport
    from services.gateway.tokenizer import TextEncoder
    log = setup_logging("gateway")
    model_dir = resolve_model_dir(args.model)
    dims = ModelDims.from_dir(model_dir)
    max_sequence_tokens = args.max_sequence_tokens
    if dims.is_decoder:   # such deployments refuse Classify anyway; the limit only has to be valid
        max_sequence_tokens = min(max_sequence_tokens, dims.max_positions)
    if max_sequence_tokens > dims.max_positions:
        raise SystemExit(f"--max-sequence-tokens {args.max_sequence_tokens} exceeds the model's "
                         f"{dims.max_positions} positions")
    store = store_grpc.KnowledgeStoreStub(channel(args.store))
    directory = TenantDirectory(store, ttl_seconds=args.tenant_cache_ttl)
    router = Router(split_addresses(args.compute), inflight_per_replica=args.inflight_per_compute)
    batcher = Batcher(router, BatcherSettings(max_batch_tokens=args.max_batch_tokens,
                                              max_batch_tenants=args.max_batch_tenants,
                                              max_wait_ms=args.max_wait_ms, max_queue=args.max_queue))
    encoder = TextEncoder(model_dir, max_sequence_tokens=max_sequence_tokens, max_texts=args.max_texts)
    generation = None
    if dims.is_decoder:
        generation = GenerationSupport(load_tokenizer(model_dir),
                                       GenerationLimits(max_new_tokens=args.max_new_tokens,
                                                        max_prompt_tokens=args.max_prompt_tokens),
                                       dims.max_positions, eos_token_ids(model_dir), router)

    def register(server):
        pb_grpc.add_GatewayServicer_to_server(GatewayServicer(encoder, directory, batcher, generation=generation), server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(store, directory), server)

    running = start_server(args.listen, register, ["hmi.v1.Gateway", "hmi.v1.Admin"], workers=64,
                           metrics_port=args.metrics_port)
    running.set_serving(True)
    log.info("gateway serving on %s (store %s, compute %s, batches <= %d tokens / %d tenants, wait <= %.1f ms)",
             args.listen, args.store, args.compute, args.max_batch_tokens, args.max_batch_tenants, args.max_wait_ms)
    wait_for_termination(running, log, on_stop=batcher.close)
