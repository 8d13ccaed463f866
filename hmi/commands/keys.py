"""`hmi key create | list | revoke`: API keys scoped to tenants (the admin credential manages them)."""
from __future__ import annotations

import time

from hmi.commands import client_parser, connect


def _when(unix_seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix_seconds)) if unix_seconds else "never"


def _describe(key) -> str:
    rights = "tenant admin" if key.tenant_admin else "inference only"
    domains = f", domains {', '.join(key.domains)}" if key.domains else ""
    state = f"revoked {_when(key.revoked_at)}" if key.revoked_at else (
        "expired" if key.expires_at and key.expires_at <= time.time() else f"expires {_when(key.expires_at)}")
    note = f" ({key.description})" if key.description else ""
    limits = ", ".join(f"{name} {value:g}" for name, value in (("rps", key.rps), ("tps", key.tps),
                                                              ("max_concurrent", key.max_concurrent)) if value)
    limits = f", limits {limits}" if limits else ""
    return f"{key.id}: tenants {', '.join(key.tenants)} ({rights}{domains}{limits}), {state}{note}"


def _split(value: str) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def cmd_key_create(args) -> int:
    if args.expires is not None and args.expires <= 0:
        raise ValueError("--expires takes a number of days above 0 (leave it out for a key that never expires)")
    with connect(args) as client:
        created = client.create_key(_split(args.tenants), tenant_admin=args.admin_of_tenants,
                                    domains=_split(args.domains), expires_in_days=args.expires or 0.0,
                                    description=args.description, rps=args.rps, tps=args.tps,
                                    max_concurrent=args.max_concurrent)
    print(f"created API key {_describe(created.key)}")
    print("keep it now: it is shown only this once (the store keeps a salted hash); send it as "
          "`authorization: Bearer <key>` or HMI_TOKEN")
    print(created.secret)
    return 0


def cmd_key_list(args) -> int:
    with connect(args) as client:
        keys = client.list_keys()
    for key in sorted(keys, key=lambda k: k.created_at):
        print(_describe(key))
    if not keys:
        print("no API keys (hmi key create --tenants ...)")
    return 0


def cmd_key_revoke(args) -> int:
    with connect(args) as client:
        key = client.revoke_key(args.key_id)
    print(f"revoked {_describe(key)}; every gateway refuses it from now on")
    return 0


def add_parsers(sub) -> None:
    key = sub.add_parser("key", help="API keys scoped to tenants (admin credential)")
    group = key.add_subparsers(dest="action", required=True)
    p = client_parser(group, "create", help="make an API key; the key itself is printed alone on the last line")
    p.add_argument("--tenants", required=True,
                   help="comma-separated tenant ids and prefixes ending in '*' (acme,acme-*); '*' = every tenant")
    p.add_argument("--admin-of-tenants", action="store_true",
                   help="may also register, train, export and delete those tenants (default: inference only)")
    p.add_argument("--domains", default="",
                   help="domains the key reaches beside those its registered tenants belong to: a tenant-admin key "
                        "registers and trains its tenants only in its domains (a new tenant needs one named here)")
    p.add_argument("--expires", type=float, default=None, metavar="DAYS", help="expire after DAYS (default: never)")
    p.add_argument("--description", default="", help="a note shown by `hmi key list`")
    p.add_argument("--rps", type=float, default=0.0, help="the key's own requests/s, beside its tenants' limits "
                                                          "(0 = none)")
    p.add_argument("--tps", type=float, default=0.0, help="the key's own tokens/s (0 = none)")
    p.add_argument("--max-concurrent", type=int, default=0, help="the key's own requests in flight (0 = none)")
    p.set_defaults(func=cmd_key_create)
    p = client_parser(group, "list", help="every key: id, scope, expiry or revocation (never the secret)")
    p.set_defaults(func=cmd_key_list)
    p = client_parser(group, "revoke", help="revoke a key (every gateway refuses it at its next change-log poll)")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_key_revoke)
