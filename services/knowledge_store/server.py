"""Knowledge-store process: `hmi serve store`."""
from __future__ import annotations

import argparse

from services.common.auth.flags import add_security_arguments, security_from_args
from services.common.config import add_observability_arguments, env, env_float, env_int, positive_float
from services.common.limits import DEFAULT_MAX_RANK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=env("HMI_STORE_ADDR"), help="address to listen on [HMI_STORE_ADDR]")
    parser.add_argument("--data-dir", default=env("HMI_DATA_DIR"), help="where LMDB lives [HMI_DATA_DIR]")
    parser.add_argument("--model", action="append", default=None,
                        help="base model: NAME=DIR, minilm, smollm2 or a folder; repeat for several (the first is "
                             "the default) [HMI_MODEL, comma-separated]")
    parser.add_argument("--map-size-gib", type=positive_float, default=env_float("HMI_STORE_MAP_SIZE_GIB", 1.0),
                        help="initial LMDB map size in GiB (fractions allowed); the store doubles it when it fills, "
                             "up to --max-map-size-gib [HMI_STORE_MAP_SIZE_GIB]")
    parser.add_argument("--max-map-size-gib", type=positive_float,
                        default=env_float("HMI_STORE_MAX_MAP_SIZE_GIB", 64.0),
                        help="ceiling of the LMDB map (the store's largest size on disk); a write past it fails with "
                             "RESOURCE_EXHAUSTED [HMI_STORE_MAX_MAP_SIZE_GIB]")
    parser.add_argument("--default-rank", type=int, default=env_int("HMI_DEFAULT_RANK", 8),
                        help="LoRA rank of random adapters [HMI_DEFAULT_RANK]")
    parser.add_argument("--max-rank", type=int, default=env_int("HMI_MAX_RANK", DEFAULT_MAX_RANK),
                        help="largest LoRA rank registration accepts: set it to the compute services' --max-rank "
                             "(the same variable sets both) [HMI_MAX_RANK]")
    parser.add_argument("--max-lookup-tokens", type=int, default=env_int("HMI_MAX_LOOKUP_TOKENS", 65536),
                        help="tokens one Lookup may ask rows for [HMI_MAX_LOOKUP_TOKENS]")
    parser.add_argument("--max-adapt-steps", type=int, default=env_int("HMI_MAX_ADAPT_STEPS", 5000),
                        help="most optimisation steps one domain adaptation may ask [HMI_MAX_ADAPT_STEPS]")
    parser.add_argument("--max-adapt-batch", type=int, default=env_int("HMI_MAX_ADAPT_BATCH", 64),
                        help="most sequences per adaptation step [HMI_MAX_ADAPT_BATCH]")
    parser.add_argument("--follower-wait-ms", type=float, default=env_float("HMI_FOLLOWER_WAIT_MS", 2000.0),
                        help="a write answers once every live gateway has read it, waiting at most this long "
                             "[HMI_FOLLOWER_WAIT_MS]")
    parser.add_argument("--domain-budget-mib", type=int, default=env_int("HMI_DOMAIN_BUDGET_MIB", 512),
                        help="default storage budget of a domain's vectors [HMI_DOMAIN_BUDGET_MIB]")
    parser.add_argument("--learn-threshold", type=int, default=env_int("HMI_LEARN_THRESHOLD", 8),
                        help="lookups of a missing context before it is materialised; -1 = do not learn from "
                             "traffic [HMI_LEARN_THRESHOLD]")
    parser.add_argument("--learn-interval", type=float, default=env_float("HMI_LEARN_INTERVAL", 2.0),
                        help="seconds between traffic flushes (materialisation, pruning) [HMI_LEARN_INTERVAL]")
    parser.add_argument("--max-file-mib", type=int, default=env_int("HMI_MAX_FILE_MIB", 64),
                        help="largest training file an upload may carry [HMI_MAX_FILE_MIB]")
    parser.add_argument("--max-files-per-key", type=int, default=env_int("HMI_MAX_FILES_PER_KEY", 100),
                        help="training files one API key may keep at once; its next upload is refused with "
                             "RESOURCE_EXHAUSTED until it deletes one (0: no limit) [HMI_MAX_FILES_PER_KEY]")
    parser.add_argument("--max-file-storage-mib-per-key", type=int,
                        default=env_int("HMI_MAX_FILE_STORAGE_MIB_PER_KEY", 1024),
                        help="bytes of training files one API key may keep, in MiB (0: no limit) "
                             "[HMI_MAX_FILE_STORAGE_MIB_PER_KEY]")
    parser.add_argument("--max-training-examples", type=int, default=env_int("HMI_MAX_TRAINING_EXAMPLES", 200_000),
                        help="examples one training file may hold [HMI_MAX_TRAINING_EXAMPLES]")
    parser.add_argument("--max-job-examples", type=int, default=env_int("HMI_MAX_JOB_EXAMPLES", 2_000_000),
                        help="examples x epochs one fine-tuning job may train on: a quota on training work per "
                             "job [HMI_MAX_JOB_EXAMPLES]")
    parser.add_argument("--max-active-jobs", type=int, default=env_int("HMI_MAX_ACTIVE_JOBS", 2),
                        help="fine-tuning jobs queued or running at once per tenant [HMI_MAX_ACTIVE_JOBS]")
    parser.add_argument("--max-training-tokens-per-day", type=int,
                        default=env_int("HMI_MAX_TRAINING_TOKENS_PER_DAY", 0),
                        help="tokens one tenant's fine-tuning jobs may train on in any 24 hours; a job that "
                             "reaches it fails, and new jobs wait (0: no limit) [HMI_MAX_TRAINING_TOKENS_PER_DAY]")
    add_observability_arguments(parser, "store")
    add_security_arguments(parser)


def main(args: argparse.Namespace) -> None:
    # Heavy imports (torch, transformers) only when the service really starts: keeps the CLI fast.
    from pathlib import Path

    from hmi_proto.v1 import knowledge_store_pb2_grpc as pb_grpc
    from services.common.auth.peers import describe
    from services.common.logs import setup_logging
    from services.common.metrics import register_state
    from services.common.model_specs import parse_model_specs
    from services.common.server import start_server, wait_for_termination
    from services.common.tracing import setup_tracing
    from services.knowledge_store.metrics import store_state
    from services.knowledge_store.servicer import KnowledgeStoreServicer
    from services.knowledge_store.store import KnowledgeStore, StoreSettings
    log = setup_logging("store", args.log_format)
    setup_tracing("store", args.tracing)
    security = security_from_args(args, "store")
    models = parse_model_specs(args.model or env("HMI_MODEL"))
    settings = StoreSettings(data_dir=Path(args.data_dir), model_dir=models[0].directory, model_name=models[0].name,
                             extra_models={spec.name: spec.directory for spec in models[1:]},
                             map_size=int(args.map_size_gib * 2**30),
                             max_map_size=int(max(args.max_map_size_gib, args.map_size_gib) * 2**30),
                             default_rank=args.default_rank, max_rank=args.max_rank,
                             max_lookup_tokens=args.max_lookup_tokens, max_adapt_steps=args.max_adapt_steps,
                             max_adapt_batch=args.max_adapt_batch, follower_wait=args.follower_wait_ms / 1e3,
                             default_budget_bytes=args.domain_budget_mib << 20,
                             default_learn_threshold=args.learn_threshold, learn_interval=args.learn_interval,
                             max_file_bytes=args.max_file_mib << 20, max_training_examples=args.max_training_examples,
                             max_owner_files=max(0, args.max_files_per_key),
                             max_owner_file_bytes=max(0, args.max_file_storage_mib_per_key) << 20,
                             max_job_examples=args.max_job_examples, max_active_jobs=args.max_active_jobs,
                             max_training_tokens_per_day=args.max_training_tokens_per_day)
    store = KnowledgeStore(settings)
    store.start_maintenance()
    register_state(lambda: store_state(store))
    running = start_server(args.listen,
                           lambda server: pb_grpc.add_KnowledgeStoreServicer_to_server(
                               KnowledgeStoreServicer(store), server),
                           ["hmi.v1.KnowledgeStore"], metrics_port=args.metrics_port, security=security,
                           internal=True, reflection_on=args.reflection, metrics_host=args.metrics_host,
                           metrics_tenant_labels=args.metrics_tenant_labels)
    running.set_serving(True)
    log.info("knowledge store serving on %s (data %s, models %s, %d domains; %s)", args.listen,
             settings.data_dir.resolve(), ", ".join(f"{m.name}={m.directory}" for m in models),
             len(store.list_domains()), describe(security, internal=True))

    def cancel_jobs() -> None:      # builds and adaptations stop at their next progress report; long polls end
        store.stopping.set()
        store.followers.close()

    wait_for_termination(running, log, on_stop=store.close, on_signal=cancel_jobs)
