"""`hmi`: start the services, administer domains and tenants, classify, embed and generate from the shell.

Client commands reach the gateway at HMI_GATEWAY_ADDR (or --gateway) with the credential in HMI_TOKEN (or
--token; on the deployment's machine the admin token `hmi up` wrote into HMI_DATA_DIR). Every failed call exits
non-zero with the server's status and message.
"""
from __future__ import annotations

import argparse
import sys

import grpc

from hmi.commands import deployment, domains, inference, keys, store, tenants, tools, tuning
from services.common.errors import HMIError
from services.common.rpc import ANSWERED_UNAVAILABLE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (deployment, domains, tenants, tuning, keys, inference, store, tools):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except grpc.RpcError as error:
        code = error.code().name if hasattr(error, "code") else "UNKNOWN"
        details = error.details() if hasattr(error, "details") else str(error)
        hint = ""
        trailing = (error.trailing_metadata() if hasattr(error, "trailing_metadata") else None) or ()
        answered = any(key == ANSWERED_UNAVAILABLE for key, _ in trailing)
        if code == "UNAVAILABLE" and "gateway" in args and not answered:   # the gateway itself was not reached
            hint = f" (is HMI running at {args.gateway}? start it with `hmi up`)"
        elif code == "UNAUTHENTICATED":
            hint = " (set HMI_TOKEN to an API key or the admin token, or pass --token)"
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
