"""The core's errors as HTTP statuses, the same for every HTTP door (each renders its own body shape)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from services.common.errors import HMIError, LimitExceeded, bounded

log = logging.getLogger("hmi.gateway.http")


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str                       # OpenAI's error type
    code: str | None = None         # OpenAI's error code (None: the status code's name, lower case)


# Status code name -> HTTP status and OpenAI error type, as OpenAI-compatible servers answer.
HTTP_ERRORS = {
    "INVALID_ARGUMENT": HttpError(400, "invalid_request_error"),
    "FAILED_PRECONDITION": HttpError(400, "invalid_request_error", "failed_precondition"),
    "OUT_OF_RANGE": HttpError(400, "invalid_request_error"),
    "UNAUTHENTICATED": HttpError(401, "authentication_error", "invalid_api_key"),
    "PERMISSION_DENIED": HttpError(403, "permission_error"),
    # An unknown tenant: 404, as OpenAI answers an unknown model (a tenant outside the key's scope: 403).
    "NOT_FOUND": HttpError(404, "invalid_request_error", "model_not_found"),
    "ALREADY_EXISTS": HttpError(409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    "CANCELLED": HttpError(499, "invalid_request_error", "cancelled"),
    "UNIMPLEMENTED": HttpError(501, "server_error"),
    "UNAVAILABLE": HttpError(503, "server_error", "unavailable"),
    "DEADLINE_EXCEEDED": HttpError(504, "server_error", "timeout"),
}
INTERNAL = HttpError(500, "server_error", "internal_error")


def as_hmi_error(error: BaseException) -> HMIError:
    """Any failure of a core call as an HMIError (an unexpected one is logged and answered as INTERNAL)."""
    if isinstance(error, HMIError):
        return error
    log.error("internal error: %s: %s", type(error).__name__, bounded(str(error)), exc_info=error)
    return HMIError(f"internal error: {type(error).__name__}: {error}")


def http_status(error: HMIError) -> HttpError:
    return HTTP_ERRORS.get(error.code_name, INTERNAL)


def retry_headers(error: HMIError) -> dict[str, str] | None:
    """Retry-After for a quota's refusal (seconds, rounded up)."""
    if isinstance(error, LimitExceeded):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
    return None


def openai_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": bounded(message), "type": type_, "param": param, "code": code}}


def openai_error(error: HMIError) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) of a failed call."""
    mapped = http_status(error)
    return mapped.status, openai_body(str(error), mapped.type, mapped.code or error.code_name.lower())
