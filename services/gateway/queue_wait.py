"""How long a request would wait in the batcher's queue, so that one that would outwait its deadline is
refused at once (RESOURCE_EXHAUSTED with a retry hint) instead of spending its deadline queued and then
failing with DEADLINE_EXCEEDED after the work of everyone ahead of it.

The wait is the tokens served before the request's last sequence divided by the rate the gateway's compute
replicas answer tokens. Under fair queuing a tenant's request waits for its own queued tokens plus, from each
other backlogged tenant, at most as many (scaled by weight): so the tokens ahead are at most
`min(all queued, (own queued + its own) x backlogged tenants / weight)`. The rate is measured, not
configured: tokens answered per second over windows in which work stayed queued throughout (an idle gateway
answers few tokens because it has few, which says nothing about how fast a queue drains)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class DrainRate:
    """Tokens/s compute answers while a queue waits; 0 until one backlogged window was measured."""
    window_s: float = 1.0
    rate: float = 0.0
    _start: float = field(default_factory=time.monotonic)
    _tokens: int = 0
    _backlogged: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def answered(self, tokens: int, backlogged: bool, now: float | None = None) -> None:
        """A batch of `tokens` was answered; `backlogged`: work was still queued when it was."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._tokens += tokens
            self._backlogged = self._backlogged and backlogged
            elapsed = now - self._start
            if elapsed < self.window_s:
                return
            if self._backlogged and self._tokens:
                measured = self._tokens / elapsed
                self.rate = measured if not self.rate else 0.5 * (self.rate + measured)
            self._start, self._tokens, self._backlogged = now, 0, True


def tokens_ahead(queued: float, own_queued: float, tokens: int, backlogged: int, weight: float) -> float:
    """Tokens served before a request's last sequence under fair queuing (an upper bound); `backlogged`
    counts the tenants with work queued, its own included once it is queued."""
    flows = max(1, backlogged)
    weight = weight if weight > 0 else 1.0
    return min(queued + tokens, (own_queued + tokens) * flows / weight)


def expected_wait(ahead: float, rate: float) -> float | None:
    """Seconds to serve `ahead` tokens at `rate`; None while no rate is known."""
    return ahead / rate if rate > 0 else None
