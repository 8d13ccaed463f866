"""How the services reach and trust each other: a shared service secret in every internal call's metadata,
TLS on every port when certificates are given, and mutual TLS between services when a CA is given too.

The knowledge store and compute are internal: they answer only callers that send the deployment's service
secret (the gateway, compute), and with `--tls-ca` only callers whose certificate that CA signed. The health
service stays open, so probes and `hmi health` need no secret. The gateway's public port takes end users'
keys instead (services/gateway/access.py)."""
from __future__ import annotations

import collections
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

SECRET_METADATA = "hmi-service-secret"
OPEN_METHODS = ("/grpc.health.v1.Health/",)      # probes need no credentials
log = logging.getLogger("hmi.auth")


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SystemExit(f"cannot read the {what} {path}: {error.strerror}") from None


@dataclass(frozen=True)
class PeerSecurity:
    """One process's credentials towards the deployment's services. Paths, not contents, so that a repr in a
    traceback never shows a secret; the service secret's repr is hidden too."""
    service_secret: str | None = None
    tls_cert: str | None = None      # this process's certificate (PEM): served, and shown to peers for mTLS
    tls_key: str | None = None
    tls_ca: str | None = None        # the CA that signed the peers' certificates
    auth: bool = True                # False: `--auth off`, no checks at all (tests, trusted networks)

    def __repr__(self) -> str:
        return (f"PeerSecurity(auth={self.auth}, service_secret={'set' if self.service_secret else 'none'}, "
                f"tls_cert={self.tls_cert!r}, tls_ca={self.tls_ca!r})")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS towards a peer when a CA is known (with this process's certificate for mutual TLS)."""
        if not self.tls_ca:
            return None
        key, cert = _read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate")
        return grpc.ssl_channel_credentials(root_certificates=_read(self.tls_ca, "TLS CA"),
                                            private_key=key if cert else None, certificate_chain=cert if key else None)

    def server_credentials(self, *, require_client_certificate: bool) -> grpc.ServerCredentials | None:
        """TLS on the listening port; client certificates signed by the CA required on internal ports."""
        if not self.tls_cert:
            return None
        if not self.tls_key:
            raise SystemExit("--tls-cert needs --tls-key (the certificate's private key)")
        ca = _read(self.tls_ca, "TLS CA") if require_client_certificate else None
        return grpc.ssl_server_credentials([(_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))],
                                           root_certificates=ca, require_client_auth=ca is not None)


def describe(security: PeerSecurity, *, internal: bool) -> str:
    """For the start-up log line: what this port checks (never a secret)."""
    if not security.auth:
        return "AUTH OFF"
    tls = ("mutual TLS" if internal and security.tls_ca else "TLS") if security.tls else "plaintext"
    return f"{tls}, {'service secret required' if internal else 'API keys required'}"


def channel(address: str, security: PeerSecurity | None, options: list) -> grpc.Channel:
    """A channel to an internal service: TLS when the CA is known, the service secret on every call."""
    credentials = security.channel_credentials() if security is not None else None
    raw = (grpc.secure_channel(address, credentials, options=options) if credentials is not None
           else grpc.insecure_channel(address, options=options))
    if security is None or not security.service_secret:
        return raw
    return grpc.intercept_channel(raw, WithMetadata(((SECRET_METADATA, security.service_secret),)))


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")), grpc.ClientCallDetails):
    pass


class WithMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (a credential) to every call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _Details(details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
                        details.credentials, getattr(details, "wait_for_ready", None),
                        getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


UNAUTHENTICATED_PEER = ("this is an internal HMI service: it answers only the deployment's own services, which send "
                        "the service secret (--service-secret-file or HMI_SERVICE_SECRET); clients call the gateway")


class RequireServiceSecret(grpc.ServerInterceptor):
    """Refuses every call without the service secret (health checks excepted), before its message is parsed."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._refused = 0
        self._logged_at = float("-inf")
        self._lock = threading.Lock()

    def _allowed(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == SECRET_METADATA:
                presented = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(presented, self._secret)
        return False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(OPEN_METHODS)
                or self._allowed(handler_call_details.invocation_metadata)):
            return handler
        self._note_refusal(handler_call_details.method)

        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_PEER)

        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                    if getattr(handler, k) is not None)
        return handler._replace(**{kind: deny})

    def _note_refusal(self, method: str) -> None:
        """Logged at most every 10 s (with the count since), so a stranger's flood cannot flood the log."""
        with self._lock:
            self._refused += 1
            if time.monotonic() - self._logged_at < 10.0:
                return
            count, self._refused, self._logged_at = self._refused, 0, time.monotonic()
        log.warning("refused %d call(s) without the service secret (latest: %s)", count, method)
