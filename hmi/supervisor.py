"""Keeps a deployment running under `hmi up`: a service that exits is started again, after a pause that
doubles with each quick failure (1 s, 2 s, 4 s, ... at most 30 s; back to 1 s once it has run for a minute),
and every exit and restart is logged. One failing service never stops the others: the gateway reports
NOT_SERVING while what it needs is down, and requests wait for it within their deadlines.

`tick()` is called from the thread that started the services (see hmi/launcher.py: children die with it)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from hmi.launcher import ServiceSet


@dataclass
class Backoff:
    first: float = 1.0
    longest: float = 30.0
    stable_after: float = 60.0          # a service that ran this long before exiting starts from `first` again

    def pause(self, failures: int) -> float:
        return min(self.longest, self.first * 2 ** max(0, failures - 1))


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Supervisor:
    services: ServiceSet
    backoff: Backoff = field(default_factory=Backoff)
    log: Callable[[str], None] = stderr_line
    _due: dict[str, float] = field(default_factory=dict)        # service -> when it starts again
    _failures: dict[str, int] = field(default_factory=dict)     # quick exits in a row

    def tick(self) -> None:
        """Notices exited services and starts those whose pause is over."""
        now = time.monotonic()
        for service in list(self.services.services):
            process = service.process
            if process is None:
                continue
            code = process.poll()
            if code is not None and service.name not in self._due:
                ran = now - service.started_at
                failures = 1 if ran >= self.backoff.stable_after else self._failures.get(service.name, 0) + 1
                self._failures[service.name] = failures
                pause = self.backoff.pause(failures)
                self._due[service.name] = now + pause
                self.log(f"hmi: {service.name} exited with code {code} after {ran:.1f}s; restarting it in "
                         f"{pause:.0f}s (restart {service.restarts + 1})")
        for name, due in list(self._due.items()):
            if now >= due:
                del self._due[name]
                self._restart(name)

    def _restart(self, name: str) -> None:
        old = next(s for s in self.services.services if s.name == name)
        fresh = next(s for s in self.services.plan() if s.name == name)
        fresh.log_file, old.log_file = old.log_file, None
        fresh.restarts = old.restarts + 1
        try:
            self.services.spawn(fresh)
        except OSError as error:
            self.log(f"hmi: cannot start {name} again: {error}")
            self._due[name] = time.monotonic() + self.backoff.longest
            return
        fresh.restarts = old.restarts + 1
        self.log(f"hmi: {name} started again (pid {fresh.process.pid})")

    def restarts(self) -> dict[str, int]:
        return {s.name: s.restarts for s in self.services.services}
