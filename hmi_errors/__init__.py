"""Errors raised by HMI's logic, each with the status code it is answered with: the bottom package, imported
by the model code (models/) and the services alike, and importing nothing of ours.

Logic modules raise these (no gRPC imports there); each service's edge (servicer.py, the gateway's doors)
translates them once. `services.common.errors` re-exports them for the services."""
from __future__ import annotations


class HMIError(Exception):
    """Base class: carries a message a person can act on."""

    code_name = "INTERNAL"


class NotFound(HMIError):
    code_name = "NOT_FOUND"


class InvalidArgument(HMIError):
    code_name = "INVALID_ARGUMENT"


class AlreadyExists(HMIError):
    code_name = "ALREADY_EXISTS"


class FailedPrecondition(HMIError):
    code_name = "FAILED_PRECONDITION"


class Unavailable(HMIError):
    code_name = "UNAVAILABLE"


class ResourceExhausted(HMIError):
    code_name = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(HMIError):
    code_name = "DEADLINE_EXCEEDED"


class Cancelled(HMIError):
    """The caller went away or the service is stopping: the work was abandoned, nothing was written."""
    code_name = "CANCELLED"


class StaleVersion(FailedPrecondition):
    """A tenant or domain changed since the caller resolved it: resolve it again and retry."""


class Unauthenticated(HMIError):
    """No credential, or one that is not valid (unknown, revoked, expired, wrong secret)."""
    code_name = "UNAUTHENTICATED"


class PermissionDenied(HMIError):
    """A valid credential that does not cover the tenant, domain or action asked for."""
    code_name = "PERMISSION_DENIED"


class LimitExceeded(ResourceExhausted):
    """A tenant's quota refused the call before any work: `limit` names it, `retry_after` (seconds) says when a
    retry may pass; both also travel in the call's trailing metadata (`hmi-limit`, `retry-after-ms`)."""

    def __init__(self, message: str, limit: str, retry_after: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("hmi-limit", self.limit), ("retry-after-ms", str(max(1, round(self.retry_after * 1000)))))


def error_of(code_name: str, message: str) -> HMIError:
    """The error of a status code's name (what a peer answered), as the class logic raises for it."""
    for kind in (NotFound, InvalidArgument, AlreadyExists, FailedPrecondition, Unavailable, ResourceExhausted,
                 DeadlineExceeded, Cancelled, Unauthenticated, PermissionDenied):
        if kind.code_name == code_name:
            return kind(message)
    error = HMIError(message)
    error.code_name = code_name if code_name and code_name.isupper() else "INTERNAL"
    return error


MAX_MESSAGE_CHARS = 1000   # a status message stays far below gRPC's metadata limits (8-16 KB), whatever it quotes


def quoted(value: object, limit: int = 80) -> str:
    """repr() of user input, cut to a short prefix that says how long the whole was: messages never echo
    unbounded input."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to `limit` characters (what every error status carries)."""
    return message if len(message) <= limit else f"{message[:limit]}... (message cut at {limit:,} characters)"
