"""`hmi domain build | adapt | list | show | delete`: domains and their PLOT, through the gateway."""
from __future__ import annotations

import sys
from pathlib import Path

from hmi.commands import client_parser, connect, print_message


def cmd_domain_build(args) -> int:
    from hmi.progress import BuildBars
    corpus = _read_corpus(args.corpus) if args.corpus else ""
    progress = BuildBars(sys.stderr)
    with connect(args) as client:
        domain = client.build_domain(args.name, corpus, split_layer=args.split_layer, context=args.context,
                                     min_count=args.min_count, parent=args.parent,
                                     budget_bytes=int(args.budget_mib * 2**20), learn_threshold=args.learn_threshold,
                                     position_offsets=not args.no_position_offsets, progress=progress,
                                     model=args.model, bridge=not args.no_bridge, bridge_steps=args.bridge_steps)
    progress.close()
    print(f"domain {domain.spec.name} ({domain.model}): split layer {domain.spec.split_layer}, "
          f"context {domain.spec.context}, "
          f"{domain.lower_model} lower model, {domain.nodes} nodes (per depth {list(domain.nodes_per_depth)}), "
          f"{domain.plot_bytes / 2**20:.1f} MiB of vectors (budget {domain.budget_bytes / 2**20:.0f} MiB)")
    if domain.HasField("bridge"):
        print(bridge_line(domain.bridge))
    return 0


def bridge_line(bridge) -> str:
    return (f"bridge        {bridge.heads} heads x {bridge.head_dim}, feed-forward {bridge.ffn} "
            f"({bridge.cost_in_layers:.2f} of a layer per token, {bridge.bytes / 2**20:.1f} MiB), distilled in "
            f"{bridge.steps} steps on {bridge.sequences} sequences ({bridge.seconds:.0f}s): held-out error "
            f"{bridge.loss_before:.4f} -> {bridge.loss_after:.4f}")


def cmd_domain_adapt(args) -> int:
    from hmi.progress import BuildBars
    progress = BuildBars(sys.stderr)
    with connect(args) as client:
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
    with connect(args) as client:
        for domain in client.list_domains():
            print(f"{domain.spec.name}\tL={domain.spec.split_layer}\tk={domain.spec.context}\tnodes={domain.nodes}"
                  f"\t{domain.plot_bytes / 2**20:.1f} MiB\t{domain.lower_model}"
                  f"{chr(9) + 'parent=' + domain.spec.parent if domain.spec.parent else ''}")
    return 0


def cmd_domain_show(args) -> int:
    with connect(args) as client:
        domain = client.get_domain(args.name)
    if args.raw:
        print_message(domain)
        return 0
    spec = domain.spec
    print(f"domain        {spec.name}" + (f" (parent {spec.parent})" if spec.parent else ""))
    print(f"model         {domain.model}, split layer {spec.split_layer}, context depth {spec.context}, "
          f"{domain.lower_model} lower model, position offsets {'on' if domain.position_offsets else 'off'}")
    if domain.HasField("bridge"):
        print(bridge_line(domain.bridge))
    elif spec.split_layer > 0:
        print("bridge        none (plain PLOT rows)")
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
    with connect(args) as client:
        client.delete_domain(args.name)
    print(f"deleted domain {args.name}")
    return 0


def add_parsers(sub) -> None:
    domain = sub.add_parser("domain", help="domains and their PLOT")
    group = domain.add_subparsers(dest="action", required=True)
    p = client_parser(group, "build", help="create or rebuild a domain's PLOT from a text file (one sequence per line)")
    p.add_argument("name")
    p.add_argument("--model", default="", help="base model of the domain and its tenants (default: the "
                                               "deployment's first)")
    p.add_argument("--corpus", help="UTF-8 text file; may be omitted for --split-layer 0")
    p.add_argument("--split-layer", type=int, default=-1,
                   help="L: PLOT replaces layers [0, L) (default: a rebuild keeps the domain's L; a new domain gets "
                        "half the layers for an encoder, 3 of MiniLM's 6, and 0 for a decoder such as SmolLM2, the "
                        "accuracy and perplexity studies' recommendations)")
    p.add_argument("--context", type=int, default=0,
                   help="k: context depth of the knowledge tree (default: a rebuild keeps the domain's k; a new "
                        "encoder domain gets 2, see docs/accuracy.md; deeper lets the tree grow longer contexts from "
                        "corpus and traffic)")
    p.add_argument("--min-count", type=int, default=2, help="keep deeper nodes seen at least this often")
    p.add_argument("--parent", default="", help="parent domain: lookups fall back to it, this one stores only what "
                                                "it adds (same split layer)")
    p.add_argument("--budget-mib", type=float, default=0, help="storage budget of the vectors (0: store default)")
    p.add_argument("--learn-threshold", type=int, default=0,
                   help="lookups of a missing context before it is added (0: store default, -1: off)")
    p.add_argument("--no-position-offsets", action="store_true",
                   help="serve raw PLOT vectors, without the per-position offsets (for ablations)")
    p.add_argument("--no-bridge", action="store_true",
                   help="serve plain PLOT rows: no domain bridge (encoder domains get one by default; see "
                        "docs/accuracy.md)")
    p.add_argument("--bridge-steps", type=int, default=0,
                   help="distillation steps of the bridge (0: 30 passes over the corpus, at most 4,000; N: exactly N)")
    p.set_defaults(func=cmd_domain_build, timeout=3600.0)
    p = client_parser(group, "adapt", help="MLM-adapt the lower layers to a domain corpus (then build the PLOT)")
    p.add_argument("name")
    p.add_argument("--corpus", required=True, help="UTF-8 text file, one sequence per line")
    p.add_argument("--split-layer", type=int, default=1, help="L: the lower layers [0, L) are adapted")
    p.add_argument("--parent", default="", help="parent domain (same split layer)")
    p.add_argument("--steps", type=int, default=0, help="optimisation steps (0: 200)")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (0: 16)")
    p.add_argument("--learning-rate", type=float, default=0.0, help="of the lower layers (0: 5e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_domain_adapt, timeout=3600.0)
    client_parser(group, "list").set_defaults(func=cmd_domain_list)
    p = client_parser(group, "show",
                      help="a domain's tree: nodes per depth, bytes, budget, learning, recent hit depths")
    p.add_argument("name")
    p.add_argument("--raw", action="store_true", help="print the whole record")
    p.set_defaults(func=cmd_domain_show)
    p = client_parser(group, "delete")
    p.add_argument("name")
    p.set_defaults(func=cmd_domain_delete)
