"""The `hmi` commands, one module per command group; each adds its parsers to the CLI's (hmi/cli.py)."""
from __future__ import annotations

import argparse
import json
from typing import Callable

from google.protobuf.json_format import MessageToDict

from services.common.config import env

ClientParser = Callable[..., argparse.ArgumentParser]   # (subparsers, name, **kwargs) -> a client command's parser


def client_parser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A command that calls the gateway: --gateway and --timeout come with it."""
    parser = subparsers.add_parser(name, **kwargs)
    parser.add_argument("--gateway", default=env("HMI_GATEWAY_ADDR"), help="gateway address [HMI_GATEWAY_ADDR]")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
    return parser


def connect(args):
    from hmi.client import HMIClient
    return HMIClient(args.gateway, timeout=args.timeout)


def print_message(message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))
