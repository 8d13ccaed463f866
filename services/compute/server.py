"""Compute process: `hmi serve compute`."""
from __future__ import annotations

import argparse

from services.common.auth.flags import add_security_arguments, security_from_args
from services.common.config import add_observability_arguments, env, env_float, env_int
from services.common.limits import DEFAULT_MAX_RANK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=env("HMI_COMPUTE_ADDR", "127.0.0.1:50053"),
                        help="address to listen on [HMI_COMPUTE_ADDR]")
    parser.add_argument("--store", default=env("HMI_STORE_ADDR"), help="knowledge store address [HMI_STORE_ADDR]")
    parser.add_argument("--model", default=env("HMI_MODEL"),
                        help="the one base model this replica serves: NAME=DIR, minilm, smollm2 or a folder "
                             "[HMI_MODEL]")
    parser.add_argument("--device", default=env("HMI_DEVICE", "auto"), help="auto, cpu or cuda[:N] [HMI_DEVICE]")
    parser.add_argument("--adapter-slots", type=int, default=env_int("HMI_ADAPTER_SLOTS", 128),
                        help="adapters resident in device memory [HMI_ADAPTER_SLOTS]")
    parser.add_argument("--max-rank", type=int, default=env_int("HMI_MAX_RANK", DEFAULT_MAX_RANK),
                        help="largest LoRA rank a slot holds; the store's --max-rank must not exceed it [HMI_MAX_RANK]")
    parser.add_argument("--host-cache-mib", type=int, default=env_int("HMI_HOST_CACHE_MIB", 1024),
                        help="host-memory adapter cache [HMI_HOST_CACHE_MIB]")
    parser.add_argument("--plot-cache-mib", type=int, default=env_int("HMI_PLOT_CACHE_MIB", 256),
                        help="encoder models: host memory for PLOT rows, so hot rows skip the store round trip and "
                             "survive a store restart; 0 = every batch asks the store [HMI_PLOT_CACHE_MIB]")
    parser.add_argument("--adapter-fetch-workers", type=int, default=env_int("HMI_ADAPTER_FETCH_WORKERS", 4),
                        help="adapters a batch misses are fetched from the store this many at a time "
                             "[HMI_ADAPTER_FETCH_WORKERS]")
    parser.add_argument("--max-batch-tokens", type=int, default=env_int("HMI_COMPUTE_MAX_BATCH_TOKENS", 16384))
    parser.add_argument("--threads", type=int, default=env_int("HMI_TORCH_THREADS", 0),
                        help="torch CPU threads; 0 = torch's default [HMI_TORCH_THREADS]")
    parser.add_argument("--execution-threads", type=int, default=env_int("HMI_EXECUTION_THREADS", 0),
                        help="batches executing at once; 0 = 1 on a GPU, on a CPU as many as it has cores "
                             "over torch threads [HMI_EXECUTION_THREADS]")
    parser.add_argument("--execute-chunk-tokens", type=int, default=env_int("HMI_EXECUTE_CHUNK_TOKENS", 0),
                        help="encoder models: batches execute in chunks of at most this many tokens, the chunks of "
                             "every waiting batch in fair order across tenants, so a light tenant waits behind at "
                             "most the chunks executing; 0 = 512 on a CPU, 8192 on a GPU [HMI_EXECUTE_CHUNK_TOKENS]")
    parser.add_argument("--kv-cache-mib", type=int, default=env_int("HMI_KV_CACHE_MIB", 1024),
                        help="decoder models: the KV pool, allocated in blocks of 16 tokens as sequences grow; "
                             "requests wait when it is full and the youngest sequence is preempted when a running "
                             "one needs a block it lacks [HMI_KV_CACHE_MIB]")
    parser.add_argument("--kv-host-mib", type=int, default=env_int("HMI_KV_HOST_MIB", 1024),
                        help="decoder models: the KV host tier: prefix-cache blocks the pool gives up for room are "
                             "copied here (host memory; pinned on a GPU) and back on a later prefix hit, so a "
                             "conversation's next turn or a preempted sequence finds its KV; LRU; on a CPU its pages "
                             "are touched as blocks arrive, on a GPU it is pinned at start; 0 = off [HMI_KV_HOST_MIB]")
    parser.add_argument("--kv-cache-dtype", choices=("float32", "int8"), default=env("HMI_KV_CACHE_DTYPE", "float32"),
                        help="decoder models: float32 (exact), or int8 with a scale per token and head (3.8x the "
                             "tokens in the same memory; perplexity in docs/performance.md) [HMI_KV_CACHE_DTYPE]")
    parser.add_argument("--decoder-weights", choices=("float32", "bfloat16"),
                        default=env("HMI_DECODER_WEIGHTS", "float32"),
                        help="decoder models (Llama family): float32 (exact), or a bfloat16 copy of the shared "
                             "projections and LM head: about 2x the decode steps per second on a CPU with AVX-512 "
                             "BF16, +0.2 %% perplexity on SmolLM2; tenants' LoRA stays fp32 [HMI_DECODER_WEIGHTS]")
    parser.add_argument("--prefix-cache", type=int, choices=(0, 1), default=env_int("HMI_PREFIX_CACHE", 1),
                        help="decoder models: 1 = keep full KV blocks for reuse by later requests of the same "
                             "tenant, adapter version and domain build (a repeated system prompt skips its "
                             "prefill); 0 = off [HMI_PREFIX_CACHE]")
    parser.add_argument("--max-step-tokens", type=int, default=env_int("HMI_MAX_STEP_TOKENS", 128),
                        help="decoder models: tokens one generation step feeds at most; longer prompts are prefilled "
                             "in chunks over several steps, so they delay the running sequences' next token less "
                             "[HMI_MAX_STEP_TOKENS]")
    parser.add_argument("--max-generating", type=int, default=env_int("HMI_MAX_GENERATING", 64),
                        help="decoder models: sequences in the running batch at most [HMI_MAX_GENERATING]")
    parser.add_argument("--max-generation-queue", type=int, default=env_int("HMI_MAX_GENERATION_QUEUE", 256),
                        help="decoder models: requests waiting for KV cache before RESOURCE_EXHAUSTED "
                             "[HMI_MAX_GENERATION_QUEUE]")
    parser.add_argument("--fine-tuning", type=int, choices=(0, 1), default=env_int("HMI_FINE_TUNING", 1),
                        help="1 = take fine-tuning jobs of this replica's base model from the store and train them "
                             "in the time inference leaves; 0 = serve only [HMI_FINE_TUNING]")
    parser.add_argument("--train-part-tokens", type=int, default=env_int("HMI_TRAIN_PART_TOKENS", 512),
                        help="tokens one training part (micro-batch) holds at most: a part started just before an "
                             "inference batch delays it by at most one part's time (docs/fine-tuning.md) "
                             "[HMI_TRAIN_PART_TOKENS]")
    parser.add_argument("--train-max-wait-ms", type=float, default=env_float("HMI_TRAIN_MAX_WAIT_MS", 2000.0),
                        help="a training part waits for the device to be free of inference at most this long, then "
                             "runs beside it, so a job progresses under full load [HMI_TRAIN_MAX_WAIT_MS]")
    parser.add_argument("--train-beside-batches", type=int, default=env_int("HMI_TRAIN_BESIDE_BATCHES", 0),
                        help="a training part may start while this many inference batches execute (0: only when "
                             "none does; more uses a CPU's spare cores for training at some cost in inference "
                             "latency) [HMI_TRAIN_BESIDE_BATCHES]")
    parser.add_argument("--checkpoint-seconds", type=float, default=env_float("HMI_CHECKPOINT_SECONDS", 30.0),
                        help="a running job's checkpoint goes to the store this often; a job whose replica dies "
                             "resumes from it elsewhere [HMI_CHECKPOINT_SECONDS]")
    parser.add_argument("--job-lease-seconds", type=float, default=env_float("HMI_JOB_LEASE_SECONDS", 30.0),
                        help="a running job's lease, renewed every 2 s; when this replica dies, another takes the "
                             "job this long after its last renewal [HMI_JOB_LEASE_SECONDS]")
    add_observability_arguments(parser, "compute")
    add_security_arguments(parser)


def pick_device(name: str):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def execution_threads(requested: int, device) -> int:
    import os

    import torch
    if requested > 0:
        return requested
    if device.type != "cpu":
        return 1
    return max(1, (os.cpu_count() or 1) // torch.get_num_threads())


def main(args: argparse.Namespace) -> None:
    # Heavy imports (torch, transformers) only when the service really starts: keeps the CLI fast.
    import torch

    from hmi_proto.v1 import compute_pb2_grpc as pb_grpc
    from models.adapter_format import parse_adapter
    from models.decoder import DecoderModel
    from models.dims import ModelDims
    from models.encoder import EncoderModel
    from models.loading import eos_token_ids
    from services.common.auth.peers import describe
    from services.common.logs import setup_logging
    from services.common.metrics import register_state
    from services.common.model_specs import parse_model_specs
    from services.common.server import start_server, wait_for_termination
    from services.common.tracing import setup_tracing
    from services.compute.adapter_invalidation import AdapterInvalidation
    from services.compute.adapter_pool import AdapterPool
    from services.compute.bridge_cache import BridgeCache
    from services.compute.constrained_output import OutputConstraints
    from services.compute.coserving import CoServingGate
    from services.compute.executor import Executor
    from services.compute.fine_tuning_worker import FineTuningWorker, WorkerSettings
    from services.compute.generation import GenerationEngine
    from services.compute.metrics import compute_state
    from services.compute.pipeline import Pipeline
    from services.compute.plot_cache import PlotRowCache, TrafficReporter
    from services.compute.servicer import ComputeServicer
    from services.compute.serving import DecoderServing, EncoderServing
    from services.knowledge_store.client import StoreClient
    log = setup_logging("compute", args.log_format)
    setup_tracing("compute", args.tracing)
    security = security_from_args(args, "compute")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    specs = parse_model_specs(args.model)
    if len(specs) != 1:
        raise SystemExit("a compute replica serves one base model: give --model once (start one replica per model)")
    model_dir, served_name = specs[0].directory, specs[0].name
    dims = ModelDims.from_dir(model_dir)
    store = StoreClient(args.store, security=security)
    if dims.is_decoder:
        model = DecoderModel(model_dir, device, weights=args.decoder_weights)
    else:
        model = EncoderModel(model_dir, device)
    pool = AdapterPool(model.dims, device, slots=args.adapter_slots, max_rank=args.max_rank,
                       host_cache_bytes=args.host_cache_mib << 20, fetch_workers=max(1, args.adapter_fetch_workers),
                       fetch=lambda tenant, version: parse_adapter(store.get_adapter(tenant, version), model.dims,
                                                                   num_labels=None))
    reporter = None
    gate = CoServingGate(max_wait=args.train_max_wait_ms / 1e3, beside=max(0, args.train_beside_batches))
    if args.train_part_tokens < 16:
        raise SystemExit(f"--train-part-tokens {args.train_part_tokens}: give at least 16")
    if dims.is_decoder:
        engine = GenerationEngine(model, pool, store.plot_rows, kv_budget_bytes=args.kv_cache_mib << 20,
                                  max_waiting=args.max_generation_queue, max_running=args.max_generating,
                                  max_step_tokens=args.max_step_tokens, prefix_caching=bool(args.prefix_cache),
                                  namespace=served_name, kv_dtype=args.kv_cache_dtype,
                                  kv_host_bytes=max(0, args.kv_host_mib) << 20,
                                  constraints=OutputConstraints(model_dir, next(iter(eos_token_ids(model_dir)), None),
                                                                dims.vocab))
        gate.watch(engine.scheduler.has_work)
        pipeline = None
        servicer = ComputeServicer(DecoderServing(engine, pool), max_batch_tokens=args.max_batch_tokens,
                                   model_name=served_name)
        mode = (f"generation: {args.decoder_weights} weights, paged {args.kv_cache_dtype} KV cache "
                f"{args.kv_cache_mib} MiB (host tier {args.kv_host_mib} MiB), prefix cache "
                f"{'on' if args.prefix_cache else 'off'}, <= {args.max_generating} sequences per step")
    else:
        engine = None
        bridges = BridgeCache(store, model.dims.hidden, device)
        plot_cache = (PlotRowCache(args.plot_cache_mib << 20, model.dims.hidden, model.dims.vocab)
                      if args.plot_cache_mib > 0 else None)
        if plot_cache is not None:
            reporter = TrafficReporter(plot_cache, store.record_traffic)
            reporter.start()
        pipeline = Pipeline(Executor(model, pool), pool, store, bridges=bridges, plot_cache=plot_cache,
                            execution_threads=execution_threads(args.execution_threads, device), gate=gate,
                            chunk_tokens=max(0, args.execute_chunk_tokens))
        mode_cache = f"PLOT row cache {args.plot_cache_mib} MiB" if plot_cache is not None else "no PLOT row cache"

        servicer = ComputeServicer(EncoderServing(pipeline), max_batch_tokens=args.max_batch_tokens,
                                   model_name=served_name)
        mode = (f"{pipeline.execution_threads} execution thread(s) of {torch.get_num_threads()} torch thread(s), "
                f"chunks of <= {pipeline.chunk_tokens} tokens in fair order, {mode_cache}")
    invalidation = AdapterInvalidation(store, pool, bridges=pipeline.bridges if pipeline is not None else None,
                                       plot_cache=pipeline.plot_cache if pipeline is not None else None)
    invalidation.start()
    tuning = None
    if args.fine_tuning:
        tuning = FineTuningWorker(store, model, model_dir, served_name, gate,
                                  WorkerSettings(part_tokens=args.train_part_tokens,
                                                 max_wait=args.train_max_wait_ms / 1e3,
                                                 checkpoint_seconds=args.checkpoint_seconds,
                                                 lease_seconds=max(1.0, args.job_lease_seconds),
                                                 report_seconds=min(2.0, max(1.0, args.job_lease_seconds) / 3)),
                                  bridges=pipeline.bridges if pipeline is not None else None, listen=args.listen)
        tuning.start()
        mode += f"; fine-tuning jobs in parts of <= {args.train_part_tokens} tokens"
    register_state(lambda: compute_state(pool, engine, served_name))
    # A generation stream holds an RPC thread while it runs: room for every running sequence, and more.
    workers = max(32, args.max_generating + 32) if dims.is_decoder else 32
    running = start_server(args.listen, lambda server: pb_grpc.add_ComputeServicer_to_server(servicer, server),
                           ["hmi.v1.Compute"], workers=workers, metrics_port=args.metrics_port, security=security,
                           internal=True, reflection_on=args.reflection, metrics_host=args.metrics_host,
                           metrics_tenant_labels=args.metrics_tenant_labels)
    running.set_serving(True)
    log.info("compute serving on %s (model %s on %s, %d adapter slots of rank <= %d, %s, store %s; %s)", args.listen,
             model_dir, device, args.adapter_slots, args.max_rank, mode, args.store, describe(security, internal=True))

    def stop():
        if tuning is not None:
            tuning.close()
        invalidation.close()
        if reporter is not None:
            reporter.close()
        if pipeline is not None:
            pipeline.close()
        if engine is not None:
            engine.close()
        store.close()

    wait_for_termination(running, log, on_stop=stop)
