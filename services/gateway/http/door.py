"""What every HTTP door uses: the core it calls (off the event loop), who is calling, and the request checks
that are HTTP's own.

Routes are async; the core's calls block (batcher futures, compute streams), so they run on a thread pool of
their own, sized like the gRPC server's."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator

from fastapi import Depends, Request

from services.gateway.core.admin import Admin
from services.gateway.core.call import Call
from services.gateway.core.fine_tuning import FineTuning
from services.gateway.core.inference import Inference
from services.gateway.http.auth import Caller, bearer_key
from services.gateway.http.errors import as_hmi_error

DEFAULT_TIMEOUT = 60.0        # seconds a unary request may take (the core's own limits apply beneath)
GENERATION_TIMEOUT = 600.0


class ApiError(Exception):
    """A request a door itself refuses (before the core is called)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


@dataclass
class Door:
    """The core behind every HTTP route, the models it serves (their folders: chat templates), and readiness."""
    inference: Inference
    admin: Admin
    model_dirs: dict[str, Path]
    ready: Callable[[], bool] = lambda: True
    fine_tuning: FineTuning | None = None
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(128, thread_name_prefix="http"))

    @staticmethod
    def call_of(caller: Caller, timeout: float = DEFAULT_TIMEOUT) -> Call:
        return Call(caller.api_key, timeout)

    async def run(self, caller: Caller, operation: Callable[..., Any], *args: Any,
                  timeout: float = DEFAULT_TIMEOUT) -> Any:
        """`operation(call, *args)` of the core, off the event loop; failures arrive as HMIErrors."""
        call = self.call_of(caller, timeout)

        def run():
            try:
                return operation(call, *args)
            except Exception as error:  # noqa: BLE001 - every failure becomes the status its code says
                raise as_hmi_error(error) from None
            finally:
                call.cancellation.fire()

        return await asyncio.get_running_loop().run_in_executor(self.pool, run)

    def stream(self, caller: Caller, operation: Callable[..., Iterator], *args: Any,
               timeout: float = GENERATION_TIMEOUT) -> "ServerStream":
        call = self.call_of(caller, timeout)
        return ServerStream(self.pool, call, operation(call, *args))


class ServerStream:
    """A stream of the core, read from async code; `cancel` (also when the client went away) ends the call:
    compute stops generating and frees the sequence's KV cache."""

    _END = object()

    def __init__(self, pool: ThreadPoolExecutor, call: Call, iterator: Iterator) -> None:
        self.pool = pool
        self.call = call
        self._iterator = iterator
        self._lock = threading.Lock()        # one thread at a time runs the generator

    def _next(self):
        with self._lock:
            try:
                return next(self._iterator, self._END)
            except Exception as error:  # noqa: BLE001
                raise as_hmi_error(error) from None

    async def next(self):
        """The next item, or None at the end; raises HMIError."""
        item = await asyncio.get_running_loop().run_in_executor(self.pool, self._next)
        return None if item is self._END else item

    def _close(self) -> None:
        with self._lock:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()

    def cancel(self) -> None:
        if self.call.cancellation.fired:
            return
        self.call.cancellation.fire()
        self.pool.submit(self._close)


def current_caller(request: Request) -> Caller:
    """Every route but health depends on this: the app's authenticator applied to the request's bearer key."""
    return request.app.state.authenticate(bearer_key(request.headers.get("authorization")))


CallerDep = Annotated[Caller, Depends(current_caller)]


def door_of(request: Request) -> Door:
    return request.app.state.door


def texts_of(value: Any, param: str = "input") -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise ApiError(400, f"{param} must be a string or a list of strings (token arrays are not accepted)", param)
    return texts


def now() -> int:
    return int(time.time())
