"""Requests are parsed inside the handler, not by gRPC: a message that does not parse (random bytes, a
truncated message, invalid UTF-8 in a string field) then answers INVALID_ARGUMENT naming the message type,
instead of gRPC's INTERNAL "Exception deserializing request!"."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import grpc

from services.common.errors import InvalidArgument


class UndecodableRequest(InvalidArgument):
    """A request message that does not parse."""


def _parser(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and anything a parser raises
            raise UndecodableRequest(f"the request to {method} is not a valid message of its type: {error}") from None
    return parse


class DecodeRequests(grpc.ServerInterceptor):
    """Wraps every handler so that it receives raw bytes and parses them itself."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _parser(handler.request_deserializer, handler_call_details.method)
        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=None, unary_unary=_unary(handler.unary_unary, parse))
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=None, unary_stream=_unary(handler.unary_stream, parse))
        if handler.stream_unary is not None:
            return handler._replace(request_deserializer=None, stream_unary=_stream_unary(handler.stream_unary, parse))
        return handler._replace(request_deserializer=None, stream_stream=_stream_stream(handler.stream_stream, parse))


def _unary(behavior, parse):
    def handle(raw, context):
        try:
            request = parse(raw)
        except UndecodableRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return behavior(request, context)
    return handle


def _parsed(requests: Iterator[bytes], parse) -> Iterator[Any]:
    for raw in requests:
        yield parse(raw)


def _stream_unary(behavior, parse):
    def handle(requests, context):
        try:
            return behavior(_parsed(requests, parse), context)
        except UndecodableRequest as error:     # a handler that does not map errors itself
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    return handle


def _stream_stream(behavior, parse):
    def handle(requests, context):
        try:
            yield from behavior(_parsed(requests, parse), context)
        except UndecodableRequest as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    return handle
