"""How long a call may take: the caller's deadline, honoured up to a maximum, or an operation's own default.

Transport-free, so that the gateway's core, its gRPC servicers and its HTTP doors bound deadlines alike."""
from __future__ import annotations

import os

# A caller's deadline is honoured up to this many seconds (HMI_MAX_DEADLINE; the gateway's --max-deadline).
DEFAULT_MAX_DEADLINE = 6 * 3600.0    # the longest store job (a domain build) may take this long
NO_DEADLINE = 1e8                    # gRPC reports "no deadline" as a remaining time of centuries
_limits = {"max_deadline": float(os.environ.get("HMI_MAX_DEADLINE") or DEFAULT_MAX_DEADLINE)}


def set_max_deadline(seconds: float) -> None:
    if not seconds > 0:
        raise ValueError("the maximum deadline must be > 0 seconds")
    _limits["max_deadline"] = float(seconds)


def max_deadline() -> float:
    return _limits["max_deadline"]


def bounded_timeout(remaining: float | None, default: float, floor: float = 0.05) -> float:
    """`remaining` seconds the caller gave (None or centuries: no deadline), up to the maximum deadline;
    `default` for a call without one."""
    if remaining is None or remaining > NO_DEADLINE:
        return default
    return max(floor, min(remaining, max_deadline()))
