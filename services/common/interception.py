"""Wrapping what a gRPC method handler does, whatever its kind of call, for the server's interceptors."""
from __future__ import annotations

import functools
from typing import Any, Callable, ContextManager


def replace_behavior(handler, unary: Callable, streaming: Callable):
    """The handler with its behaviour passed through `unary` (one response) or `streaming` (a response stream)."""
    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming(handler.unary_stream))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    return handler._replace(stream_stream=streaming(handler.stream_stream))


def run_inside(handler, around: Callable[[Any], ContextManager]):
    """Each call of the handler runs inside `around(context)`, until its last response is sent; the wrapper
    keeps the behaviour's marks (a refusal's `fast_path`)."""
    def unary(behavior):
        @functools.wraps(behavior)
        def run(request, context):
            with around(context):
                return behavior(request, context)
        return run

    def streaming(behavior):
        @functools.wraps(behavior)
        def run(request, context):
            with around(context):
                yield from behavior(request, context)
        return run

    return replace_behavior(handler, unary, streaming)
