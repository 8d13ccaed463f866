"""Who is calling: the one place where the HTTP front door checks credentials.

Every /v1 route depends on `authenticate` (app.py), applied to the request's `Authorization: Bearer <key>`
header: the gateway passes `checked_by(access.principal_of)`, so a missing or invalid key answers 401 in
OpenAI's error shape before the body is looked at; with `--auth off` everyone gets in. The key also travels to
the core as the call's credential, where the same check (then cached) decides what the caller may do, for
HTTP and gRPC callers alike (services/gateway/access.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from services.common.errors import Unauthenticated


class AuthenticationFailed(Exception):
    """Answered 401 in OpenAI's error shape."""


@dataclass(frozen=True)
class Caller:
    api_key: str | None = None

    def __repr__(self) -> str:              # never print a credential
        return f"Caller(api_key={'set' if self.api_key else 'none'})"


Authenticator = Callable[[str | None], Caller]     # the bearer key (None: no Authorization header) -> caller


def allow_all(api_key: str | None) -> Caller:
    return Caller(api_key)


def checked_by(verify: Callable[[str | None], object]) -> Authenticator:
    """An authenticator that lets in only the callers `verify` accepts (it raises Unauthenticated otherwise)."""

    def authenticate(api_key: str | None) -> Caller:
        try:
            verify(api_key)
        except Unauthenticated as error:
            raise AuthenticationFailed(str(error)) from None
        return Caller(api_key)

    return authenticate


def bearer_key(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return (key.strip() or None) if scheme.lower() == "bearer" else None
