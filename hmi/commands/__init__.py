"""The `hmi` commands, one module per command group; each adds its parsers to the CLI's (hmi/cli.py)."""
from __future__ import annotations

import argparse
import json
from typing import Callable

from google.protobuf.json_format import MessageToDict

from services.common.config import env

ClientParser = Callable[..., argparse.ArgumentParser]   # (subparsers, name, **kwargs) -> a client command's parser


def client_parser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A command that calls the gateway: --gateway, --timeout, --token and --tls-ca come with it."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.add_argument("--gateway", default=env("HMI_GATEWAY_ADDR"), help="gateway address [HMI_GATEWAY_ADDR]")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    parser.add_argument("--token", default=None,
                        help="credential: an API key or the admin token (prefer the variable, which `ps` does not "
                             "show) [HMI_TOKEN; else HMI_ADMIN_TOKEN, else the file HMI_DATA_DIR/admin.token]")
    parser.add_argument("--tls-ca", default=env("HMI_TLS_CA", "") or None,
                        help="PEM file of the CA that signed the gateway's certificate: connect with TLS [HMI_TLS_CA]")
    return parser


def connect(args):
    from hmi.client import HMIClient
    from hmi.credentials import cli_token
    return HMIClient(args.gateway, timeout=args.timeout, token=cli_token(args.token) or "", tls_ca=args.tls_ca or "")


def print_message(message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
