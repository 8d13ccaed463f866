"""A request body limit checked while the body is read, so an oversized body is refused before it is parsed
(or even received whole): from Content-Length when the client sends one, else by counting what arrives."""
from __future__ import annotations

import json

from services.gateway.http.errors import openai_body

TOO_LARGE = "hmi.body_too_large"   # scope key: set when the limit was crossed mid-body


class BodyTooLarge(Exception):
    pass


def too_large_message(limit: int, size: int | None = None) -> str:
    sent = f" ({size:,} bytes sent)" if size is not None else ""
    return (f"the request body exceeds the limit of {limit:,} bytes{sent} (the gateway's --max-http-body-mib); "
            f"send fewer or shorter texts per request")


DRAIN_BYTES = 64 << 20   # read and dropped before answering 413, so the client sees the answer, not a reset


async def drain(receive) -> None:
    """Reads what is left of the body without keeping it (up to DRAIN_BYTES; past that the connection closes)."""
    left = DRAIN_BYTES
    while left > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        left -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


class BodyLimit:
    """ASGI middleware: 413 with OpenAI's error shape for a body over `limit` bytes."""

    def __init__(self, app, limit: int, upload_limit: int = 0, upload_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.limit = limit
        self.upload_limit = max(limit, upload_limit)   # file uploads (training files) may be larger
        self.upload_paths = upload_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope.get("path") in self.upload_paths else self.limit
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await drain(receive)
            await self.refuse(send, too_large_message(limit, int(declared)))
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    scope[TOO_LARGE] = True
                    if message.get("more_body"):
                        await drain(receive)
                    raise BodyTooLarge(too_large_message(limit))
            return message

        await self.app(scope, counted, send)

    @staticmethod
    async def refuse(send, message: str) -> None:
        body = json.dumps(openai_body(message, "invalid_request_error", "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
