"""Calling the gateway's gRPC servicers in process: a call context that carries the HTTP request's deadline,
caller metadata and cancellation, and gRPC statuses turned into HTTP errors in OpenAI's JSON shape."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import grpc

from services.common.errors import HMIError, LimitExceeded, bounded


class CallFailed(grpc.RpcError):
    """A servicer aborted (or a call beneath it failed): its gRPC status and message.

    Subclasses grpc.RpcError without a `code` attribute, as grpc's own abort does, so the servicers' error
    decorators let it through unchanged."""

    def __init__(self, status: grpc.StatusCode, message: str,
                 trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.trailing_metadata = tuple(trailing_metadata or ())

    def retry_after(self) -> float | None:
        """Seconds until a retry may pass (a quota's hint), None without one."""
        for key, value in self.trailing_metadata:
            if key == "retry-after-ms":
                return int(value) / 1000
        return None


class InProcessContext:
    """The part of grpc.ServicerContext the gateway's servicers use, for a call made in this process."""

    def __init__(self, timeout: float, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.deadline = time.monotonic() + timeout
        self.metadata = metadata
        self._callbacks: list[Callable[[], Any]] = []
        self._cancelled = False
        self.trailing_metadata: tuple[tuple[str, str], ...] = ()
        self._lock = threading.Lock()

    def time_remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return "in-process:http"

    def is_active(self) -> bool:
        return not self._cancelled and self.time_remaining() > 0

    def add_callback(self, callback: Callable[[], Any]) -> bool:
        with self._lock:
            if self._cancelled:
                callback()
                return False
            self._callbacks.append(callback)
        return True

    def cancel(self) -> None:
        """The HTTP client went away: runs what the servicer registered (e.g. cancelling compute's stream)."""
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def abort(self, code: grpc.StatusCode, details: str):
        raise CallFailed(code, details, self.trailing_metadata)

    def abort_with_status(self, status):
        raise CallFailed(status.code, status.details, self.trailing_metadata)

    def set_code(self, code) -> None:        # unary servicers that set a status without aborting
        self._code = code

    def set_details(self, details) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing_metadata = metadata


def as_call_failed(error: BaseException) -> CallFailed:
    """Any error of a call made in process, as the status a gRPC client would have seen."""
    if isinstance(error, CallFailed):
        return error
    if isinstance(error, LimitExceeded):
        return CallFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error), error.trailing_metadata())
    if isinstance(error, HMIError):
        return CallFailed(getattr(grpc.StatusCode, error.code_name, grpc.StatusCode.INTERNAL), str(error))
    if isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        return CallFailed(error.code(), error.details() or error.code().name)
    return CallFailed(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str
    code: str | None = None


# gRPC status -> HTTP status and OpenAI error type, as OpenAI-compatible servers answer.
HTTP_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpError(400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.OUT_OF_RANGE: HttpError(400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: HttpError(401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: HttpError(403, "permission_error"),
    # An unknown tenant: 404, as OpenAI answers an unknown model (a tenant outside the key's scope: 403).
    grpc.StatusCode.NOT_FOUND: HttpError(404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: HttpError(409, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpError(429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: HttpError(499, "invalid_request_error", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: HttpError(501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: HttpError(503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpError(504, "server_error", "timeout"),
}


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": bounded(message), "type": type_, "param": param, "code": code}}


def http_error(failure: CallFailed) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) of a failed call."""
    mapped = HTTP_ERRORS.get(failure.status, HttpError(500, "server_error", "internal_error"))
    return mapped.status, error_body(failure.message, mapped.type, mapped.code or failure.status.name.lower())
