"""The HTTP application: every door's routes behind one body limit, credentials checked once, errors in the
shape of the door a route belongs to (OpenAI's JSON for /v1, KServe's for /v2, TEI's for its routes)."""
from __future__ import annotations

import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import HMIError, bounded
from services.gateway import metrics
from services.gateway.http import hmi_api, kserve, openai_api, openai_fine_tuning, tei, vllm_tokens
from services.gateway.http.auth import AuthenticationFailed, Authenticator, allow_all
from services.gateway.http.body_limit import TOO_LARGE, BodyLimit, too_large_message
from services.gateway.http.door import ApiError, CallerDep, Door
from services.gateway.http.errors import http_status, openai_body, retry_headers

DEFAULT_MAX_BODY_BYTES = 4 << 20

# (status, message, OpenAI error type, code, param) -> the response a door's clients read.
Renderer = Callable[[int, str, str, "str | None", "str | None"], JSONResponse]


def openai_response(status: int, message: str, type_: str, code: str | None, param: str | None) -> JSONResponse:
    return JSONResponse(openai_body(message, type_, code, param), status_code=status)


def renderer_of(path: str) -> Renderer:
    """The error shape of the door that serves `path`."""
    for door in (kserve, tei):
        if door.serves(path):
            return door.error_response
    return openai_response


def create_app(door: Door, authenticate: Authenticator = allow_all,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> BodyLimit:
    """The HTTP doors: FastAPI routes behind a body limit. No Swagger page (it loads its assets from a public CDN,
    which an offline deployment cannot reach); the OpenAPI document needs a credential like every route but
    the health ones."""
    app = FastAPI(title="HMI", version="1", description="Thousands of tenant models behind one endpoint: an "
                  "OpenAI-compatible API (the `model` is the tenant id), classification, the Open Inference "
                  "Protocol (KServe v2) and Text Embeddings Inference routes.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.door = door
    app.state.authenticate = authenticate

    def respond(request: Request, status: int, message: str, type_: str, code: str | None = None,
                param: str | None = None, headers: dict | None = None) -> JSONResponse:
        response = renderer_of(request.url.path)(status, bounded(message), type_, code, param)
        response.headers.update(headers or {})
        return response

    @app.exception_handler(HMIError)
    async def failed(request: Request, error: HMIError):
        mapped = http_status(error)
        return respond(request, mapped.status, str(error), mapped.type, mapped.code or error.code_name.lower(),
                       headers=retry_headers(error))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return respond(request, error.status, error.message, "invalid_request_error", error.code, error.param)

    @app.exception_handler(AuthenticationFailed)
    async def unauthenticated(request: Request, error: AuthenticationFailed):
        return respond(request, 401, str(error) or "invalid API key", "authentication_error", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, error: StarletteHTTPException):
        # FastAPI's own refusals (a body that is not JSON or not UTF-8, nesting too deep, an unknown route, a
        # wrong method) in the door's shape, like every other error.
        if request.scope.get(TOO_LARGE):
            return respond(request, 413, too_large_message(max_body_bytes), "invalid_request_error",
                           "request_too_large")
        message = error.detail if isinstance(error.detail, str) else "invalid request"
        return respond(request, error.status_code, message, "invalid_request_error" if error.status_code < 500
                       else "server_error", headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                            for e in problems) or "invalid request"
        return respond(request, 400, message, "invalid_request_error", None, param)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_caller: CallerDep) -> dict:
        return app.openapi()

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.HTTP_REQUESTS.labels(route, str(response.status_code)).inc()
        metrics.HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus(caller: CallerDep) -> Response:
        # Metrics name the busiest tenants: on the public door, for the admin only (Prometheus scrapes the
        # metrics port, which is not public).
        if not door.admin.access.principal_of(caller.api_key).admin:
            raise ApiError(403, "/metrics needs the admin credential (Prometheus scrapes --metrics-port)")
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", tags=["health"], summary="liveness: the gateway process answers")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["health"], summary="readiness: the store and compute for every model answer")
    async def ready():
        if not door.ready():
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "models": list(door.inference.lanes)}

    for routes in (hmi_api.router, openai_api.router, openai_fine_tuning.router, kserve.router, tei.router,
                   vllm_tokens.router):
        app.include_router(routes)
    return BodyLimit(app, max_body_bytes, upload_limit=openai_fine_tuning.MAX_UPLOAD_BYTES,
                     upload_paths=(openai_fine_tuning.UPLOAD_PATH,))
