"""Who is calling: the one place where the HTTP front door will check credentials.

Every /v1 route depends on `authenticate` (app.py). Today it lets everyone in and only remembers a bearer
key if one was sent; an API-key check replaces `allow_all` with a function that raises
AuthenticationFailed for a bad key. The key also travels to the servicers as `authorization` metadata of
the in-process call, so a check made there (for gRPC clients too) sees HTTP callers the same way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class AuthenticationFailed(Exception):
    """Answered 401 in OpenAI's error shape."""


@dataclass(frozen=True)
class Caller:
    api_key: str | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What the in-process gRPC call carries, as a gRPC client would send it."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


Authenticator = Callable[[str | None], Caller]     # the bearer key (None: no Authorization header) -> caller


def allow_all(api_key: str | None) -> Caller:
    return Caller(api_key)


def bearer_key(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None
