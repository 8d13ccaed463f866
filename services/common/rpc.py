"""gRPC plumbing shared by services: channel and server options, error mapping."""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import grpc
import grpc.experimental

from services.common.auth.peers import PeerSecurity
from services.common.auth.peers import channel as peer_channel
from services.common.deadlines import bounded_timeout, max_deadline, set_max_deadline  # noqa: F401 - re-exported
from services.common.errors import MAX_MESSAGE_CHARS, HMIError, LimitExceeded, bounded, error_of

# Explicit limits on both sides (the 4 MiB default is the classic trap); large tensors stream in chunks anyway.
MAX_MESSAGE_BYTES = 64 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    # A DNS name with several replicas behind it (compose --scale) is balanced per call.
    ("grpc.lb_policy_name", "round_robin"),
    # Two processes never share a port: a second server on a taken port fails instead of splitting its calls.
    ("grpc.so_reuseport", 0),
    # Reconnect quickly after a peer restarts (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

ANSWERED_UNAVAILABLE = "hmi-answered-unavailable"   # trailing metadata: this service answered UNAVAILABLE itself
log = logging.getLogger("hmi.rpc")


def channel(address: str, *, own_connection: bool = False, authority: str | None = None,
            security: PeerSecurity | None = None, iterated_streams: bool = False) -> grpc.Channel:
    """A channel to another HMI service: TLS and the service secret as `security` says (None: plaintext, no
    secret). `own_connection`: not shared with other channels to the same address, so failures of a background
    poller (which grow the reconnect backoff) never make the calls of a request fail fast. `authority`: the
    name the peer is known by when `address` is one of the addresses behind it (discovery); with TLS the
    peer's certificate is checked against that name, not the address. `iterated_streams`: every server stream
    of this channel is only iterated (and perhaps cancelled), never given callbacks, so gRPC may read it on the
    caller's thread instead of starting a thread per call (compute's PLOT and adapter fetches: measured 0.2 ms of
    CPU less per call)."""
    options = CHANNEL_OPTIONS + ([("grpc.use_local_subchannel_pool", 1)] if own_connection else [])
    if iterated_streams:
        options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
    if authority:
        options.append(("grpc.default_authority", authority))
        if security is not None and security.tls_ca:
            options.append(("grpc.ssl_target_name_override", authority.rpartition(":")[0] or authority))
    return peer_channel(address, security, options)


def _status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)


def abort_with(context: grpc.ServicerContext, error: BaseException) -> None:
    """Maps an error to a status; a downstream RpcError keeps its code and message. An UNAVAILABLE this service
    answers carries the ANSWERED_UNAVAILABLE marker: the caller reached it, so retrying elsewhere may not help
    (services/compute/client.py reads it)."""
    if isinstance(error, HMIError):
        code, details = _status(error.code_name), str(error)
    elif isinstance(error, grpc.RpcError) and hasattr(error, "code"):
        code, details = peer_status(error)
    else:
        code, details = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
        log.error("%s", bounded(details), exc_info=None if len(str(error)) > MAX_MESSAGE_CHARS else error)
    if isinstance(error, LimitExceeded):
        context.set_trailing_metadata(error.trailing_metadata())
    elif code == grpc.StatusCode.UNAVAILABLE:
        context.set_trailing_metadata(((ANSWERED_UNAVAILABLE, "1"),))
    context.abort(code, bounded(details))


def handles_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Servicer decorator for unary responses: no exception escapes as a bare UNKNOWN."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - this is the edge where errors become statuses
            if isinstance(error, grpc.RpcError) and not hasattr(error, "code"):
                raise  # context.abort() already set the status
            abort_with(context, error)

    return wrapper


def handles_stream_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Same as handles_errors, for methods that yield a response stream."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as error:  # noqa: BLE001
            if isinstance(error, grpc.RpcError) and not hasattr(error, "code"):
                raise
            abort_with(context, error)

    return wrapper


def remaining_timeout(context: grpc.ServicerContext, default: float, floor: float = 0.05) -> float:
    """The caller's deadline (up to the maximum deadline), passed on to calls this request makes; `default`
    for a call without a deadline."""
    return bounded_timeout(context.time_remaining(), default, floor)


def peer_status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status a peer's failed call is passed on with: its code and message, and "a peer service is
    unavailable" before an UNAVAILABLE's (UNKNOWN for an error that carries no status)."""
    if not hasattr(error, "code"):
        return grpc.StatusCode.UNKNOWN, str(error) or "UNKNOWN"
    code = error.code()
    details = error.details() or code.name
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"a peer service is unavailable: {details}"
    return code, details


def peer_error(error: grpc.RpcError) -> HMIError:
    """A peer's failed call as the HMIError of its status (peer_status)."""
    code, details = peer_status(error)
    return error_of(code.name, details)


@contextmanager
def peer_errors() -> Iterator[None]:
    """A peer's gRPC status becomes its HMIError (peer_error): logic above a call to another service sees only
    HMIErrors."""
    try:
        yield
    except grpc.RpcError as error:
        if not hasattr(error, "code"):
            raise
        raise peer_error(error) from None


def peer_unreachable(error: BaseException) -> bool:
    """A call to a peer could not be answered by it (down, restarting, or too slow), as opposed to an answer
    about the request; caches may then keep serving what the peer told them last."""
    return isinstance(error, grpc.RpcError) and hasattr(error, "code") and error.code() in (
        grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
