"""What a door knows of a call besides its request: who is calling, until when, and whether they are still there."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from services.common.deadlines import bounded_timeout


class Cancellation:
    """Fires once when the call is over: its caller went away, or its door finished with it. The core registers
    what must then stop (work still queued, a compute stream, a quota permit); a callback added after it fired
    runs at once."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], Any]] = []
        self._fired = False
        self._lock = threading.Lock()

    @property
    def fired(self) -> bool:
        return self._fired

    def add_callback(self, callback: Callable[[], Any]) -> None:
        with self._lock:
            if not self._fired:
                self._callbacks.append(callback)
                return
        callback()

    def fire(self) -> None:
        with self._lock:
            if self._fired:
                return
            self._fired = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


@dataclass
class Call:
    """`credential`: the bearer credential the caller sent (None: none); `deadline`: the seconds the caller gave
    (None: no deadline, the operation's own default applies), counted from `arrived`."""
    credential: str | None = None
    deadline: float | None = None
    cancellation: Cancellation = field(default_factory=Cancellation)
    arrived: float = field(default_factory=time.monotonic)
    principal: Any = field(default=None, repr=False)     # who the credential is, once checked (Inference)

    def timeout(self, default: float) -> float:
        """Seconds left, within the maximum deadline; `default` for a call without a deadline."""
        if self.deadline is None:
            return default
        return bounded_timeout(self.deadline - (time.monotonic() - self.arrived), default)
