"""Request ids across the services: each call carries one in its metadata (`x-request-id`, made at the first
service when the client sent none), the handler's logs show it, and the calls it makes pass it on, so one
request can be followed through gateway, compute and store logs (and, with tracing on, spans)."""
from __future__ import annotations

import contextvars
import re
import uuid
from typing import Iterable

REQUEST_ID_KEY = "x-request-id"
MAX_IDS = 16                       # a batch names at most this many of its requests
_VALID = re.compile(r"^[\x21-\x7e]{1,1024}$")
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("hmi_request_id", default="")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def current_request_id() -> str:
    return _request_id.get()


def set_request_id(request_id: str) -> contextvars.Token:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token) -> None:
    _request_id.reset(token)


def incoming_request_id(metadata: Iterable[tuple[str, str]] | None) -> str:
    """The caller's request id when it sent a usable one, else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID.match(value):
            return value
    return new_request_id()


def joined(request_ids: Iterable[str]) -> str:
    """The ids of the requests a batch carries, as one metadata value."""
    unique = list(dict.fromkeys(i for i in request_ids if i))
    return ",".join(unique[:MAX_IDS]) + (f",+{len(unique) - MAX_IDS}" if len(unique) > MAX_IDS else "")
