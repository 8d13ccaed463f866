"""`hmi classify`, `hmi embed`, `hmi generate`, `hmi tokenize`: a tenant's model through the gateway."""
from __future__ import annotations

import json
import sys

from hmi.commands import client_parser, connect


def cmd_classify(args) -> int:
    with connect(args) as client:
        predictions = client.classify(args.tenant_id, args.texts, truncate=args.truncate)
    for text, prediction in zip(args.texts, predictions):
        probabilities = ", ".join(f"{label}={p:.3f}" for label, p in prediction.probabilities.items())
        print(f"{prediction.label}\t{probabilities}\t{text}")
    return 0


def cmd_embed(args) -> int:
    with connect(args) as client:
        vectors = client.embed(args.tenant_id, args.texts, truncate=args.truncate)
    for vector in vectors:
        print(json.dumps([round(v, 6) for v in vector]))
    return 0


def cmd_generate(args) -> int:
    with connect(args) as client:
        stream = client.generate(args.tenant_id, args.prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                 stop=args.stop, presence_penalty=args.presence_penalty,
                                 frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty)
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


def cmd_tokenize(args) -> int:
    """One line per text: its token count, then each token as id:piece (JSON, so spaces and specials show)."""
    with connect(args) as client:
        answer = client.tokenize(args.tenant_id, args.texts, special_tokens=not args.no_special_tokens)
    for tokens in answer.texts:
        pieces = " ".join(f"{i}:{json.dumps(p, ensure_ascii=False)}" for i, p in zip(tokens.ids, tokens.pieces))
        print(f"{len(tokens.ids)}\t{pieces}")
    print(f"[at most {answer.max_model_len} tokens per sequence]", file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    group = sub
    p = client_parser(group, "classify", help="label and probabilities for each text")
    p.add_argument("tenant_id")
    p.add_argument("texts", nargs="+")
    p.add_argument("--truncate", action="store_true", help="keep the head of over-long texts instead of failing")
    p.set_defaults(func=cmd_classify)
    p = client_parser(group, "embed", help="pooled vector for each text")
    p.add_argument("tenant_id")
    p.add_argument("texts", nargs="+")
    p.add_argument("--truncate", action="store_true", help="keep the head of over-long texts instead of failing")
    p.set_defaults(func=cmd_embed)
    p = client_parser(group, "generate", help="stream text from a generative tenant (decoder base model)")
    p.add_argument("tenant_id")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="the same seed gives the same text (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop after this string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2], 0 = off (OpenAI's)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2], 0 = off (OpenAI's)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="(0, 2], 1 = off (transformers')")
    p.set_defaults(func=cmd_generate)
    p = client_parser(group, "tokenize", help="token ids and pieces of each text as the tenant's base model reads it")
    p.add_argument("tenant_id")
    p.add_argument("texts", nargs="+")
    p.add_argument("--no-special-tokens", action="store_true", help="leave out [CLS]/[SEP] or BOS")
    p.set_defaults(func=cmd_tokenize)
