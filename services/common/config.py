"""Flags with environment-variable defaults, the same names in `hmi up`, tests and compose.yaml."""
from __future__ import annotations

import os

DEFAULTS = {
    "HMI_GATEWAY_ADDR": "127.0.0.1:50051",
    "HMI_HTTP_ADDR": "127.0.0.1:8000",
    "HMI_STORE_ADDR": "127.0.0.1:50052",
    "HMI_COMPUTE_ADDRS": "127.0.0.1:50053",
    "HMI_DATA_DIR": "./var",
    "HMI_MODEL": "minilm",
}


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name)
    if value:
        return value
    if default is not None:
        return default
    return DEFAULTS[name]


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (e.g. `--map-size-gib 0.5`)."""
    import argparse
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number above 0")
    return value


def split_addresses(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_observability_arguments(parser, service: str) -> None:
    """Flags every service takes: metrics port, log format, tracing."""
    default_port = {"gateway": "HMI_GATEWAY_METRICS_PORT", "compute": "HMI_COMPUTE_METRICS_PORT",
                    "store": "HMI_STORE_METRICS_PORT"}[service]
    parser.add_argument("--metrics-port", type=int, default=env_int(default_port, 0),
                        help=f"serve Prometheus metrics at http://HOST:PORT/metrics (HOST: --listen's); 0 = off "
                             f"[{default_port}]")
    parser.add_argument("--metrics-tenant-labels", action="store_true",
                        default=env("HMI_METRICS_TENANT_LABELS", "") in ("1", "true", "yes"),
                        help="also serve the per-tenant series (tenant names) on the metrics port; by default only "
                             "the admin-only HTTP /metrics has them [HMI_METRICS_TENANT_LABELS]")
    parser.add_argument("--log-format", choices=("text", "json"), default=env("HMI_LOG_FORMAT", "text"),
                        help="text, or json: one object per line with the request id [HMI_LOG_FORMAT]")
    parser.add_argument("--tracing", default=env("HMI_TRACING", "off"),
                        help="OpenTelemetry spans: off, otlp (OTEL_EXPORTER_OTLP_* variables), otlp:HOST:PORT, "
                             "console or file:PATH; needs the tracing extra [HMI_TRACING]")
