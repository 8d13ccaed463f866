"""The HTTP application: routes, the call helpers every route uses, errors in OpenAI's JSON shape.

Routes are async; the servicer calls they make block (batcher futures, compute streams), so they run on a
thread pool of their own, sized like the gRPC server's."""
from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from hmi_proto.v1 import gateway_pb2 as pb
from services.common.errors import bounded
from services.gateway import metrics
from services.gateway.http.auth import AuthenticationFailed, Authenticator, Caller, allow_all, bearer_key
from services.gateway.http.body_limit import TOO_LARGE, BodyLimit, too_large_message
from services.gateway.http.calls import CallFailed, InProcessContext, as_call_failed, error_body, http_error
from services.gateway.http.chat import ChatTemplates
from services.gateway.servicer import AdminServicer, GatewayServicer

DEFAULT_TIMEOUT = 60.0        # seconds a unary request may take (the gRPC servicers' own limits apply beneath)
GENERATION_TIMEOUT = 600.0


class ApiError(Exception):
    """A request the HTTP layer itself refuses (before any servicer is called)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Doors:
    """What the routes reach: the gateway's servicers (one request path for gRPC and HTTP), the models it
    serves, and readiness."""
    gateway: GatewayServicer
    admin: AdminServicer
    model_dirs: dict[str, Path]
    ready: Callable[[], bool] = lambda: True
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(128, thread_name_prefix="http"))
    chat: ChatTemplates | None = None

    def __post_init__(self) -> None:
        if self.chat is None:
            tokenizers = {name: lane.generation.tokenizer for name, lane in self.gateway.lanes.items()
                          if lane.generation is not None}
            self.chat = ChatTemplates(self.model_dirs, tokenizers)

    def is_decoder(self, model: str) -> bool:
        lane = self.gateway.lanes.get(model or self.gateway.default_model)
        return lane is not None and lane.generation is not None

    async def call(self, caller: Caller, method: Callable[[Any, InProcessContext], Any], request: Any = None,
                   timeout: float = DEFAULT_TIMEOUT) -> Any:
        """A unary servicer method (or any function of a request and a context), off the event loop."""
        context = InProcessContext(timeout, caller.metadata())

        def run():
            try:
                return method(request, context)
            except Exception as error:  # noqa: BLE001 - every failure becomes the status a gRPC client would see
                raise as_call_failed(error) from None

        return await asyncio.get_running_loop().run_in_executor(self.pool, run)

    def stream(self, caller: Caller, method: Callable[[Any, InProcessContext], Iterator], request: Any,
               timeout: float = GENERATION_TIMEOUT) -> "ServerStream":
        return ServerStream(self, method, request, InProcessContext(timeout, caller.metadata()))


class ServerStream:
    """A server-streaming servicer method, read from async code; closing it early cancels the call (the
    servicer's callbacks run: compute stops generating and frees the sequence's KV cache)."""

    _END = object()

    def __init__(self, doors: Doors, method, request, context: InProcessContext) -> None:
        self.doors = doors
        self.context = context
        self._iterator = method(request, context)

    def _next(self):
        try:
            return next(self._iterator, self._END)
        except Exception as error:  # noqa: BLE001
            raise as_call_failed(error) from None

    async def next(self):
        """The next message, or None at the end; raises CallFailed."""
        item = await asyncio.get_running_loop().run_in_executor(self.doors.pool, self._next)
        return None if item is self._END else item

    def cancel(self) -> None:
        self.context.cancel()


def current_caller(request: Request) -> Caller:
    """Every /v1 route depends on this: the app's authenticator applied to the request's bearer key."""
    return request.app.state.authenticate(bearer_key(request.headers.get("authorization")))


CallerDep = Annotated[Caller, Depends(current_caller)]


def doors_of(request: Request) -> Doors:
    return request.app.state.doors


DEFAULT_MAX_BODY_BYTES = 4 << 20


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description="the tenant id")
    input: str | list[str] = Field(description="one text or a list of texts")
    truncate: bool = Field(False, description="keep the head of an over-long text instead of refusing it")


def texts_of(value: str | list, param: str = "input") -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise ApiError(400, f"{param} must be a string or a list of strings (token arrays are not accepted)", param)
    return texts


def create_app(doors: Doors, authenticate: Authenticator = allow_all,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> BodyLimit:
    """The HTTP door: FastAPI routes behind a body limit. No Swagger page (it loads its assets from a public CDN,
    which an offline deployment cannot reach); the OpenAPI document needs a credential like every route but
    /health and /ready."""
    from services.gateway.http.openai_api import router as openai_router

    app = FastAPI(title="HMI", version="1", description="Thousands of tenant models behind one endpoint: an "
                  "OpenAI-compatible API (the `model` is the tenant id) and classification.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.doors = doors
    app.state.authenticate = authenticate

    @app.exception_handler(CallFailed)
    async def call_failed(_request, failure: CallFailed):
        status, body = http_error(failure)
        retry_after = failure.retry_after()
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError):
        return JSONResponse(error_body(error.message, "invalid_request_error", error.code, error.param),
                            status_code=error.status)

    @app.exception_handler(AuthenticationFailed)
    async def unauthenticated(_request, error: AuthenticationFailed):
        return JSONResponse(error_body(str(error) or "invalid API key", "authentication_error", "invalid_api_key"),
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, error: StarletteHTTPException):
        # FastAPI's own refusals (a body that is not JSON or not UTF-8, nesting too deep, an unknown route, a
        # wrong method) in OpenAI's shape, like every other error.
        if request.scope.get(TOO_LARGE):
            return JSONResponse(error_body(too_large_message(max_body_bytes), "invalid_request_error",
                                           "request_too_large"), status_code=413)
        message = error.detail if isinstance(error.detail, str) else "invalid request"
        return JSONResponse(error_body(bounded(message), "invalid_request_error" if error.status_code < 500
                                       else "server_error", None), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                            for e in problems) or "invalid request"
        return JSONResponse(error_body(bounded(message), "invalid_request_error", None, param), status_code=400)

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
        if not doors.admin.access.principal_of(caller.api_key).admin:
            raise ApiError(403, "/metrics needs the admin credential (Prometheus scrapes --metrics-port)")
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", tags=["health"], summary="liveness: the gateway process answers")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["health"], summary="readiness: the store and compute for every model answer")
    async def ready():
        if not doors.ready():
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "models": list(doors.gateway.lanes)}

    @app.post("/v1/classify", tags=["hmi"], summary="label and probabilities per text (a classifier tenant)")
    async def classify(body: ClassifyBody, who: CallerDep) -> dict:
        texts = texts_of(body.input)
        reply = await doors.call(who, doors.gateway.Classify,
                                 pb.ClassifyRequest(tenant_id=body.model, texts=texts, truncate=body.truncate))
        data = [{"index": i, "label": r.label, "probabilities": dict(zip(r.labels, map(float, r.probabilities)))}
                for i, r in enumerate(reply.results)]
        return {"object": "list", "model": body.model, "data": data,
                "usage": {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}}

    app.include_router(openai_router)
    return BodyLimit(app, max_body_bytes)


def now() -> int:
    return int(time.time())
