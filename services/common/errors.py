"""Errors raised by service logic, mapped to gRPC status codes at the servicer edge.

Logic modules raise these (no gRPC imports there); servicers translate them once.
"""
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
