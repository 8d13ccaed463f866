"""`hmi tenant register | train | list | show | delete`: tenants and their adapters, through the gateway."""
from __future__ import annotations

import sys
from pathlib import Path

from hmi.commands import client_parser, connect, print_message
from services.common.config import env


def cmd_tenant_register(args) -> int:
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else []
    with connect(args) as client:
        adapter = None
        if args.adapter and Path(args.adapter).is_dir():
            adapter, labels = _from_peft(client, args, labels)
        elif args.adapter:
            adapter = Path(args.adapter).read_bytes()
            if not adapter:
                raise ValueError(f"adapter file {args.adapter} is empty (0 bytes)")
        tenant = client.register_tenant(args.tenant_id, args.domain, labels, adapter, rank=args.rank,
                                        seed=args.seed, model=args.model)
    _print_tenant(tenant)
    return 0


def _from_peft(client, args, labels: list[str]) -> tuple[bytes, list[str]]:
    """A PEFT LoRA folder converted to HMI's format, checked against the domain before it is sent."""
    from models.peft_format import import_peft
    from services.common.errors import InvalidArgument
    converted = import_peft(Path(args.adapter), keep_head=not args.no_head)
    for note in converted.notes:
        print(f"note: {note}", file=sys.stderr)
    labels = labels or converted.labels
    if converted.head_labels and not labels:
        raise InvalidArgument(f"the adapter has a classification head with {converted.head_labels} outputs: give "
                              f"--labels with {converted.head_labels} names, or --no-head for an embedding-only "
                              f"tenant")
    if labels and not converted.head_labels:
        raise InvalidArgument("the adapter has no classification head (a Linear named classifier or score in "
                              "modules_to_save): register it without --labels, as an embedding-only tenant")
    split_layer = client.get_domain(args.domain).spec.split_layer
    below = [layer for layer in converted.layers if layer < split_layer]
    if below:
        raise InvalidArgument(f"the adapter changes layer(s) {below}, below domain {args.domain!r}'s split layer "
                              f"{split_layer}: those layers are served from PLOT, not computed. Train it with "
                              f"layers_to_transform at or above {split_layer}, or use a domain built with "
                              f"--split-layer 0")
    print(f"converted PEFT LoRA ({converted.family}): rank {converted.rank}, layers {converted.layers}, targets "
          f"{','.join(converted.targets)}" + (f", head of {converted.head_labels} labels" if converted.head_labels
                                              else ""), file=sys.stderr)
    return converted.adapter, labels


LIMIT_FIELDS = ("rps", "tps", "max_concurrent", "max_queued", "priority")


def cmd_tenant_limits(args) -> int:
    with connect(args) as client:
        limits = client.get_tenant_limits(args.tenant_id)
        changes = {name: getattr(args, name) for name in LIMIT_FIELDS if getattr(args, name) is not None}
        if changes:
            values = {name: getattr(limits, name) for name in LIMIT_FIELDS} | changes
            limits = client.set_tenant_limits(args.tenant_id, **values)
    shown = ", ".join(f"{name} {getattr(limits, name):g}" if getattr(limits, name) else f"{name} -"
                      for name in LIMIT_FIELDS)
    print(f"tenant {args.tenant_id}: {shown}  (- = none: the gateway's default)")
    return 0


def cmd_tenant_export(args) -> int:
    import json

    from models.peft_format import export_peft
    from services.common.model_specs import resolve_model_dir
    with connect(args) as client:
        tenant = client.get_tenant(args.tenant_id)
        adapter = client.get_adapter(args.tenant_id)
    model_dir = resolve_model_dir(args.model or tenant.spec.model)
    family = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    written = export_peft(adapter, Path(args.peft), family=family, base_model=str(model_dir),
                          tenant_id=args.tenant_id, labels=list(tenant.spec.labels))
    print(f"wrote {', '.join(written)} to {args.peft} (PeftModel.from_pretrained on {model_dir})")
    return 0


def _print_tenant(tenant) -> None:
    kind = f"labels {','.join(tenant.spec.labels)}" if tenant.spec.labels else \
        "no labels (generative on a decoder, embedding-only on an encoder)"
    print(f"tenant {tenant.spec.tenant_id}: model {tenant.spec.model}, domain {tenant.spec.domain}, {kind}, "
          f"adapter v{tenant.adapter_version} (rank {tenant.rank}, {tenant.adapter_bytes} bytes)")


def cmd_tenant_train(args) -> int:
    from hmi.progress import TrainBar
    from models.dims import ModelDims
    from services.common.model_specs import KNOWN_MODELS, resolve_model_dir
    from training.tenant_training import train_generative_tenant, train_tenant

    progress = TrainBar(sys.stderr)
    labels = [label.strip() for label in args.labels.split(",")] if args.labels else None
    with connect(args) as client:
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
                                  max_train=args.max_train, seed=args.seed, progress=progress,
                                  targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
            progress.close()
            print(f"trained on {report.train_examples} examples; eval accuracy {report.eval_accuracy:.4f} "
                  f"on {report.eval_examples} examples (final loss {report.final_loss:.4f})")
            tenant = client.register_tenant(args.tenant_id, args.domain, report.labels, report.adapter)
    _print_tenant(tenant)
    return 0


def cmd_tenant_list(args) -> int:
    with connect(args) as client:
        reply = client.list_tenants(args.domain, args.limit)
    for tenant in reply.tenants:
        print(f"{tenant.spec.tenant_id}\t{tenant.spec.domain}\t{','.join(tenant.spec.labels)}\tv{tenant.adapter_version}")
    print(f"{len(reply.tenants)} of {reply.total} tenants", file=sys.stderr)
    return 0


def cmd_tenant_show(args) -> int:
    with connect(args) as client:
        print_message(client.get_tenant(args.tenant_id))
    return 0


def cmd_tenant_delete(args) -> int:
    with connect(args) as client:
        client.delete_tenant(args.tenant_id)
    print(f"deleted tenant {args.tenant_id}")
    return 0


def add_parsers(sub) -> None:
    tenant = sub.add_parser("tenant", help="tenants and their adapters")
    group = tenant.add_subparsers(dest="action", required=True)
    p = client_parser(group, "register", help="register or replace a tenant")
    p.add_argument("tenant_id")
    p.add_argument("--domain", required=True)
    p.add_argument("--model", default="", help="base model (default: its domain's; must match it when given)")
    p.add_argument("--labels", default="", help="comma-separated class names, in head order (classifiers of an "
                                                "encoder model; without labels an encoder's tenant only embeds, "
                                                "a decoder's generates)")
    p.add_argument("--adapter", help="HMI adapter .safetensors, or a PEFT LoRA folder (adapter_config.json + "
                                     "adapter_model.safetensors), converted here; none: a fresh random adapter")
    p.add_argument("--no-head", action="store_true", help="PEFT folder: leave its classification head out "
                                                          "(an embedding-only tenant)")
    p.add_argument("--rank", type=int, default=0, help="rank of a random adapter (0: the store's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of a random adapter (0: random)")
    p.set_defaults(func=cmd_tenant_register)
    p = client_parser(group, "train",
                      help="train the tenant's LoRA adapter (and head) on PLOT outputs, then register it")
    p.add_argument("tenant_id")
    p.add_argument("--domain", required=True)
    p.add_argument("--train", required=True, help="classifiers: JSONL of {\"text\", \"label\"}; generative "
                                                  "tenants (decoder models): a text file, one text per line")
    p.add_argument("--eval", help="held-out data in the same format, for the accuracy (or perplexity) report")
    p.add_argument("--labels", help="comma-separated class names in head order (default: sorted labels of --train)")
    p.add_argument("--model", default=None, help="the domain's base model folder (default: the domain's packaged "
                                                 "model, else HMI_MODEL)")
    p.add_argument("--max-steps", type=int, default=0, help="generative tenants: stop after N steps (0: epochs)")
    p.add_argument("--targets", default="",
                   help="projections that get LoRA (query,key,value,attn_out,ffn_in,ffn_out; Llama also ffn_gate). "
                        "Default: every one of them on an encoder domain with a split layer, query,value otherwise")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train", type=int, default=0, help="use at most N training examples (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tenant_train, timeout=600.0)
    p = client_parser(group, "export", help="write the tenant's adapter as a PEFT LoRA folder")
    p.add_argument("tenant_id")
    p.add_argument("--peft", required=True, metavar="DIR", help="folder to write (PeftModel.from_pretrained loads it)")
    p.add_argument("--model", default="", help="the base model's folder or packaged name (default: the tenant's "
                                               "model, when it is a packaged one)")
    p.set_defaults(func=cmd_tenant_export)
    p = client_parser(group, "list")
    p.add_argument("--domain", default="")
    p.add_argument("--limit", type=int, default=0)
    p.set_defaults(func=cmd_tenant_list)
    p = client_parser(group, "show")
    p.add_argument("tenant_id")
    p.set_defaults(func=cmd_tenant_show)
    p = client_parser(group, "delete")
    p.add_argument("tenant_id")
    p.set_defaults(func=cmd_tenant_delete)
    p = client_parser(group, "limits", help="show the tenant's quotas and scheduling share, or set those given "
                                            "(the others keep their values; 0 = no limit)")
    p.add_argument("tenant_id")
    p.add_argument("--rps", type=float, help="requests per second")
    p.add_argument("--tps", type=float, help="tokens per second (prompt tokens; + max new tokens when generating)")
    p.add_argument("--max-concurrent", type=int, help="requests in flight at once")
    p.add_argument("--max-queued", type=int, help="sequences waiting in a gateway's batcher (0: the gateway's "
                                                  "--max-queue-per-tenant)")
    p.add_argument("--priority", type=int, help="weight in fair scheduling: 2 gets twice the share of 1 (0 = 1)")
    p.set_defaults(func=cmd_tenant_limits)
