"""`hmi`: start the services, administer domains and tenants, classify, embed and generate from the shell.

Client commands reach the gateway at HMI_GATEWAY_ADDR (or --gateway). Every failed call exits
non-zero with the server's status and message.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from services.common.config import env, split_addresses
from services.common.errors import HMIError


def _print_message(message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def _client(args):
    from hmi.client import HMIClient
    return HMIClient(args.gateway, timeout=args.timeout)


# ---- services -----------------------------------------------------------------------------------

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
                          log_dir=Path(args.log_dir) if args.log_dir else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        services.start(timeout=args.start_timeout)
        others = "".join(f", {name} compute {address}" for name, address in services.other_compute.items())
        print(f"HMI is ready: gateway {args.gateway}, store {args.store_addr}, "
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


# ---- domains ------------------------------------------------------------------------------------

def cmd_domain_build(args) -> int:
    from hmi.progress import BuildBars
    corpus = _read_corpus(args.corpus) if args.corpus else ""
    progress = BuildBars(sys.stderr)
    with _client(args) as client:
        domain = client.build_domain(args.name, corpus, split_layer=args.split_layer, context=args.context,
                                     min_count=args.min_count, parent=args.parent,
                                     budget_bytes=int(args.budget_mib * 2**20), learn_threshold=args.learn_threshold,
                                     position_offsets=not args.no_position_offsets, progress=progress,
                                     model=args.model)
    progress.close()
    print(f"domain {domain.spec.name} ({domain.model}): split layer {domain.spec.split_layer}, "
          f"context {domain.spec.context}, "
          f"{domain.lower_model} lower model, {domain.nodes} nodes (per depth {list(domain.nodes_per_depth)}), "
          f"{domain.plot_bytes / 2**20:.1f} MiB of vectors (budget {domain.budget_bytes / 2**20:.0f} MiB)")
    return 0


def cmd_domain_adapt(args) -> int:
    from hmi.progress import BuildBars
    progress = BuildBars(sys.stderr)
    with _client(args) as client:
        domain = client.adapt_domain(args.name, _read_corpus(args.corpus), split_layer=args.split_layer,
                                     parent=args.parent, steps=args.steps, batch_size=args.batch_size,
                                     learning_rate=args.learning_rate, seed=args.seed, progress=progress)
    progress.close()
    report = domain.adapt
    print(f"domain {domain.spec.name}: lower layers [0, {domain.spec.split_layer}) adapted in {report.steps} steps "
          f"on {report.corpus_sequences} sequences ({report.seconds:.0f}s); held-out masked-token loss "
          f"{report.base_loss:.3f} (base) -> {report.adapted_loss:.3f} (adapted)")
    print(f"next: hmi domain build {domain.spec.name} --corpus {args.corpus} --split-layer {domain.spec.split_layer}")
    return 0


def _read_corpus(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: cannot read corpus {path}: {error}") from error


def cmd_domain_list(args) -> int:
    with _client(args) as client:
        for domain in client.list_domains():
            print(f"{domain.spec.name}\tL={domain.spec.split_layer}\tk={domain.spec.context}\tnodes={domain.nodes}"
                  f"\t{domain.plot_bytes / 2**20:.1f} MiB\t{domain.lower_model}"
                  f"{chr(9) + 'parent=' + domain.spec.parent if domain.spec.parent else ''}")
    return 0


def cmd_domain_show(args) -> int:
    with _client(args) as client:
        domain = client.get_domain(args.name)
    if args.raw:
        _print_message(domain)
        return 0
    spec = domain.spec
    print(f"domain        {spec.name}" + (f" (parent {spec.parent})" if spec.parent else ""))
    print(f"model         {domain.model}, split layer {spec.split_layer}, context depth {spec.context}, "
          f"{domain.lower_model} lower model, position offsets {'on' if domain.position_offsets else 'off'}")
    if domain.lower_model == "adapted":
        print(f"adaptation    {domain.adapt.steps} MLM steps on {domain.adapt.corpus_sequences} sequences, held-out "
              f"loss {domain.adapt.base_loss:.3f} -> {domain.adapt.adapted_loss:.3f}")
    print(f"nodes         {domain.nodes}")
    for depth, count in enumerate(domain.nodes_per_depth, start=1):
        print(f"  depth {depth:<5} {count}")
    print(f"vectors       {domain.plot_bytes / 2**20:.1f} MiB of {domain.budget_bytes / 2**20:.0f} MiB budget "
          f"({100 * domain.plot_bytes / max(domain.budget_bytes, 1):.0f}%)")
    learning = (f"materialise after {domain.learn_threshold} lookups" if domain.learn_threshold > 0 else "off")
    print(f"learning      {learning}; {domain.materialized_nodes} materialised, {domain.pruned_nodes} pruned, "
          f"{domain.pending_contexts} contexts counted")
    total = sum(domain.recent_hit_depths)
    print(f"recent hits   {total} tokens" + ("" if total else " (no lookups since the store started)"))
    for depth, count in enumerate(domain.recent_hit_depths, start=1):
        if total:
            print(f"  depth {depth:<5} {count:>9} {100 * count / total:5.1f}%")
    print(f"corpus        {domain.corpus_sequences} sequences, {domain.corpus_tokens} tokens")
    return 0


def cmd_domain_delete(args) -> int:
    with _client(args) as client:
        client.delete_domain(args.name)
    print(f"deleted domain {args.name}")
    return 0


# ---- tenants ------------------------------------------------------------------------------------

def cmd_tenant_register(args) -> int:
    adapter = Path(args.adapter).read_bytes() if args.adapter else None
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else []
    with _client(args) as client:
        tenant = client.register_tenant(args.tenant_id, args.domain, labels, adapter, rank=args.rank,
                                        seed=args.seed, model=args.model)
    _print_tenant(tenant)
    return 0


def _print_tenant(tenant) -> None:
    kind = f"labels {','.join(tenant.spec.labels)}" if tenant.spec.labels else "generative"
    print(f"tenant {tenant.spec.tenant_id}: model {tenant.spec.model}, domain {tenant.spec.domain}, {kind}, "
          f"adapter v{tenant.adapter_version} (rank {tenant.rank}, {tenant.adapter_bytes} bytes)")


def cmd_tenant_train(args) -> int:
    from hmi.progress import TrainBar
    from models.dims import ModelDims
    from services.common.model_specs import KNOWN_MODELS, resolve_model_dir
    from services.training.tenant_training import train_generative_tenant, train_tenant

    progress = TrainBar(sys.stderr)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    with _client(args) as client:
        domain = client.get_domain(args.domain)
        # --model, else the domain's base model when it is a packaged one, else HMI_MODEL.
        model_dir = resolve_model_dir(args.model or (domain.model if domain.model in KNOWN_MODELS
                                                     else env("HMI_MODEL").split(",")[0]))
        if ModelDims.from_dir(model_dir).is_decoder:
            report = train_generative_tenant(
                client, model_dir, args.domain, Path(args.train), Path(args.eval) if args.eval else None,
                epochs=args.epochs, rank=args.rank, learning_rate=args.learning_rate, batch_size=args.batch_size,
                max_train=args.max_train, max_steps=args.max_steps, seed=args.seed, progress=progress,
                targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
            progress.close()
            print(f"trained on {report.train_texts} texts; held-out perplexity {report.base_perplexity:.2f} (base) "
                  f"-> {report.eval_perplexity:.2f} (tenant) on {report.eval_texts} texts "
                  f"(final loss {report.final_loss:.4f})")
            tenant = client.register_tenant(args.tenant_id, args.domain, [], report.adapter)
        else:
            report = train_tenant(client, model_dir, args.domain, Path(args.train),
                                  Path(args.eval) if args.eval else None, labels, epochs=args.epochs, rank=args.rank,
                                  learning_rate=args.learning_rate, batch_size=args.batch_size,
                                  max_train=args.max_train, seed=args.seed, progress=progress)
            progress.close()
            print(f"trained on {report.train_examples} examples; eval accuracy {report.eval_accuracy:.4f} "
                  f"on {report.eval_examples} examples (final loss {report.final_loss:.4f})")
            tenant = client.register_tenant(args.tenant_id, args.domain, report.labels, report.adapter)
    _print_tenant(tenant)
    return 0


def cmd_tenant_list(args) -> int:
    with _client(args) as client:
        reply = client.list_tenants(args.domain, args.limit)
    for tenant in reply.tenants:
        print(f"{tenant.spec.tenant_id}\t{tenant.spec.domain}\t{','.join(tenant.spec.labels)}\tv{tenant.adapter_version}")
    print(f"{len(reply.tenants)} of {reply.total} tenants", file=sys.stderr)
    return 0


def cmd_tenant_show(args) -> int:
    with _client(args) as client:
        _print_message(client.get_tenant(args.tenant_id))
    return 0


def cmd_tenant_delete(args) -> int:
    with _client(args) as client:
        client.delete_tenant(args.tenant_id)
    print(f"deleted tenant {args.tenant_id}")
    return 0


# ---- inference ----------------------------------------------------------------------------------

def cmd_classify(args) -> int:
    with _client(args) as client:
        predictions = client.classify(args.tenant_id, args.texts, truncate=args.truncate)
    for text, prediction in zip(args.texts, predictions):
        probabilities = ", ".join(f"{label}={p:.3f}" for label, p in prediction.probabilities.items())
        print(f"{prediction.label}\t{probabilities}\t{text}")
    return 0


def cmd_embed(args) -> int:
    with _client(args) as client:
        vectors = client.embed(args.tenant_id, args.texts, truncate=args.truncate)
    for vector in vectors:
        print(json.dumps([round(v, 6) for v in vector]))
    return 0


def cmd_generate(args) -> int:
    with _client(args) as client:
        stream = client.generate(args.tenant_id, args.prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 stop=args.stop)
        reason, produced = "", 0
        try:
            for message in stream:
                sys.stdout.write(message.text)
                sys.stdout.flush()
                produced += len(message.token_ids)
                reason = message.finish_reason or reason
        except KeyboardInterrupt:
            stream.cancel()
            reason = "cancelled"
    print()
    print(f"[{produced} tokens, finish: {reason}]", file=sys.stderr)
    return 0


def cmd_health(args) -> int:
    from hmi.client import is_serving
    serving = is_serving(args.address, timeout=args.timeout)
    print(f"{args.address}: {'SERVING' if serving else 'NOT SERVING'}")
    return 0 if serving else 1


def cmd_demo(args) -> int:
    from hmi.demo import run_demo
    return run_demo(args)


def cmd_bench(args) -> int:
    from hmi.bench.runner import run_bench
    return run_bench(args)


# ---- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def client_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        p = sub_target[0].add_parser(name, **kwargs)
        p.add_argument("--gateway", default=env("HMI_GATEWAY_ADDR"), help="gateway address [HMI_GATEWAY_ADDR]")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
        return p

    sub_target = [sub]
    up = sub.add_parser("up", help="start store, compute and gateway as local processes")
    up.add_argument("--gateway", default=env("HMI_GATEWAY_ADDR"), help="[HMI_GATEWAY_ADDR]")
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

    domain = sub.add_parser("domain", help="domains and their PLOT")
    sub_target[0] = domain.add_subparsers(dest="action", required=True)
    p = client_parser("build", help="create or rebuild a domain's PLOT from a text file (one sequence per line)")
    p.add_argument("name")
    p.add_argument("--model", default="", help="base model of the domain and its tenants (default: the "
                                               "deployment's first)")
    p.add_argument("--corpus", help="UTF-8 text file; may be omitted for --split-layer 0")
    p.add_argument("--split-layer", type=int, default=-1,
                   help="L: PLOT replaces layers [0, L) (default: a rebuild keeps the domain's L; a new domain gets "
                        "1 for an encoder such as MiniLM and 0 for a decoder such as SmolLM2, the accuracy and "
                        "perplexity studies' recommendations)")
    p.add_argument("--context", type=int, default=1,
                   help="k: context depth of the knowledge tree (default 1, see docs/accuracy.md; > 1 lets the "
                        "tree grow deeper contexts from corpus and traffic)")
    p.add_argument("--min-count", type=int, default=2, help="keep deeper nodes seen at least this often")
    p.add_argument("--parent", default="", help="parent domain: lookups fall back to it, this one stores only what "
                                                "it adds (same split layer)")
    p.add_argument("--budget-mib", type=float, default=0, help="storage budget of the vectors (0: store default)")
    p.add_argument("--learn-threshold", type=int, default=0,
                   help="lookups of a missing context before it is added (0: store default, -1: off)")
    p.add_argument("--no-position-offsets", action="store_true",
                   help="serve raw PLOT vectors, without the per-position offsets (for ablations)")
    p.set_defaults(func=cmd_domain_build, timeout=3600.0)
    p = client_parser("adapt", help="MLM-adapt the lower layers to a domain corpus (then build the PLOT)")
    p.add_argument("name")
    p.add_argument("--corpus", required=True, help="UTF-8 text file, one sequence per line")
    p.add_argument("--split-layer", type=int, default=1, help="L: the lower layers [0, L) are adapted")
    p.add_argument("--parent", default="", help="parent domain (same split layer)")
    p.add_argument("--steps", type=int, default=0, help="optimisation steps (0: 200)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (0: 16)")
    p.add_argument("--learning-rate", type=float, default=0.0, help="of the lower layers (0: 5e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_domain_adapt, timeout=3600.0)
    client_parser("list").set_defaults(func=cmd_domain_list)
    p = client_parser("show", help="a domain's tree: nodes per depth, bytes, budget, learning, recent hit depths")
    p.add_argument("name")
    p.add_argument("--raw", action="store_true", help="print the whole record")
    p.set_defaults(func=cmd_domain_show)
    p = client_parser("delete")
    p.add_argument("name")
    p.set_defaults(func=cmd_domain_delete)

    tenant = sub.add_parser("tenant", help="tenants and their adapters")
    sub_target[0] = tenant.add_subparsers(dest="action", required=True)
    p = client_parser("register", help="register or replace a tenant")
    p.add_argument("tenant_id")
    p.add_argument("--domain", required=True)
    p.add_argument("--model", default="", help="base model (default: its domain's; must match it when given)")
    p.add_argument("--labels", default="", help="comma-separated class names, in head order (classifiers of an "
                                                "encoder model; generative tenants of a decoder take none)")
    p.add_argument("--adapter", help="adapter .safetensors; none: a fresh random adapter")
    p.add_argument("--rank", type=int, default=0, help="rank of a random adapter (0: the store's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random adapter (0: random)")
    p.set_defaults(func=cmd_tenant_register)
    p = client_parser("train", help="train the tenant's LoRA adapter (and head) on PLOT outputs, then register it")
    p.add_argument("tenant_id")
    p.add_argument("--domain", required=True)
    p.add_argument("--train", required=True, help="classifiers: JSONL of {\"text\", \"label\"}; generative "
                                                  "tenants (decoder models): a text file, one text per line")
    p.add_argument("--eval", help="held-out data in the same format, for the accuracy (or perplexity) report")
    p.add_argument("--labels", help="comma-separated class names in head order (default: sorted labels of --train)")
    p.add_argument("--model", default=None, help="the domain's base model folder (default: the domain's packaged "
                                                 "model, else HMI_MODEL)")
    p.add_argument("--max-steps", type=int, default=0, help="generative tenants: stop after N steps (0: epochs)")
    p.add_argument("--targets", default="query,value",
                   help="generative tenants: projections that get LoRA (query,key,value,attn_out,ffn_in,ffn_out; "
                        "Llama also ffn_gate)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train", type=int, default=0, help="use at most N training examples (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tenant_train, timeout=600.0)
    p = client_parser("list")
    p.add_argument("--domain", default="")
    p.add_argument("--limit", type=int, default=0)
    p.set_defaults(func=cmd_tenant_list)
    p = client_parser("show")
    p.add_argument("tenant_id")
    p.set_defaults(func=cmd_tenant_show)
    p = client_parser("delete")
    p.add_argument("tenant_id")
    p.set_defaults(func=cmd_tenant_delete)

    sub_target[0] = sub
    p = client_parser("classify", help="label and probabilities for each text")
    p.add_argument("tenant_id")
    p.add_argument("texts", nargs="+")
    p.add_argument("--truncate", action="store_true", help="keep the head of over-long texts instead of failing")
    p.set_defaults(func=cmd_classify)
    p = client_parser("embed", help="pooled vector for each text")
    p.add_argument("tenant_id")
    p.add_argument("texts", nargs="+")
    p.add_argument("--truncate", action="store_true", help="keep the head of over-long texts instead of failing")
    p.set_defaults(func=cmd_embed)
    p = client_parser("generate", help="stream text from a generative tenant (decoder base model)")
    p.add_argument("tenant_id")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop after this string (repeatable)")
    p.set_defaults(func=cmd_generate)

    health = sub.add_parser("health", help="exit 0 when the service at ADDRESS reports SERVING (health checks)")
    health.add_argument("address")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=cmd_health)

    demo = sub.add_parser("demo", help="start everything, build a domain, register tenants, send traffic, stop")
    demo.add_argument("--tenants", type=int, default=300)
    demo.add_argument("--requests", type=int, default=600)
    demo.add_argument("--clients", type=int, default=16)
    demo.add_argument("--data-dir", default=None, help="default: a fresh temporary folder")
    demo.add_argument("--no-trained", dest="trained", action="store_false",
                      help="skip training the real tenants (they need ../shared/datasets)")
    demo.add_argument("--train-examples", type=int, default=1500)
    demo.add_argument("--corpus-lines", type=int, default=8000)
    demo.add_argument("--no-generate", dest="generate", action="store_false",
                      help="skip the generative SmolLM2 tenants")
    demo.add_argument("--new-tokens", type=int, default=32, help="tokens each generative tenant writes")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="naive per-tenant models vs PEFT multi-adapter vs HMI, same workload")
    from hmi.bench.runner import add_arguments as bench_args
    bench_args(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except grpc.RpcError as error:
        code = error.code().name if hasattr(error, "code") else "UNKNOWN"
        details = error.details() if hasattr(error, "details") else str(error)
        hint = ""
        if code == "UNAVAILABLE" and "gateway" in args and "peer service" not in (details or ""):
            hint = f" (is HMI running at {args.gateway}? start it with `hmi up`)"
        print(f"error: {code}: {details}{hint}", file=sys.stderr)
        return 1
    except HMIError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
