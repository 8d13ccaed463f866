"""Failed calls as typed exceptions, one per gRPC status code, so callers catch what they can handle.

Each is also a `grpc.RpcError` with `code()` and `details()`, as the raw stubs' errors are, so code written
against grpc keeps working."""
from __future__ import annotations

import contextlib
from typing import Iterator

import grpc


class HMIError(grpc.RpcError):
    """A call that failed: `code()` is its gRPC status, `details()` the server's message."""

    status = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None,
                 trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self._code = code or self.status
        self._details = details
        self._trailing = tuple(trailing_metadata or ())

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing

    @property
    def retry_after(self) -> float | None:
        """Seconds after which a retry may pass (RESOURCE_EXHAUSTED from a tenant's quota), else None."""
        for key, value in self._trailing:
            if key == "retry-after-ms":
                return int(value) / 1000
        return None

    @property
    def limit(self) -> str | None:
        """The quota that refused the call (rps, tps, max_concurrent, max_queued), else None."""
        return next((value for key, value in self._trailing if key == "hmi-limit"), None)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}"


class Cancelled(HMIError):
    status = grpc.StatusCode.CANCELLED


class InvalidArgument(HMIError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(HMIError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(HMIError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(HMIError):
    status = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(HMIError):
    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(HMIError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(HMIError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(HMIError):
    status = grpc.StatusCode.UNIMPLEMENTED


class Internal(HMIError):
    status = grpc.StatusCode.INTERNAL


class Unavailable(HMIError):
    status = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(HMIError):
    status = grpc.StatusCode.UNAUTHENTICATED


BY_CODE = {cls.status: cls for cls in (Cancelled, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
                                       PermissionDenied, ResourceExhausted, FailedPrecondition, Unimplemented,
                                       Internal, Unavailable, Unauthenticated)}


def from_rpc_error(error: grpc.RpcError) -> HMIError:
    """The typed exception for a raw gRPC error (UNKNOWN and unlisted codes give HMIError itself)."""
    if isinstance(error, HMIError):
        return error
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else "") or str(error) or code.name
    trailing = ()
    if hasattr(error, "trailing_metadata"):
        try:
            trailing = tuple((key, value) for key, value in (error.trailing_metadata() or ())
                             if isinstance(value, str))
        except Exception:  # noqa: BLE001 - a call object without trailers: no hint
            trailing = ()
    return BY_CODE.get(code, HMIError)(details, code, trailing)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raises the typed exception in place of a raw gRPC error."""
    try:
        yield
    except HMIError:
        raise
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
