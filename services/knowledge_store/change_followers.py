"""Who follows the change log, and how far: long polls answer as soon as a change commits, and a write
waits (bounded) until every live follower has read it.

Gateways cache tenant and domain records until the change log says they changed. Without this, a change
made through one gateway reached the others only at their next poll, so for a moment they served a deleted
or replaced tenant. Now a write returns once every live follower has asked for changes after it (they
long-poll, so that takes a round trip), hence "registered" means "served as such by every gateway". A
follower that stops asking is no longer waited for after `live_seconds`; none is waited for longer than
`max_wait` (then the gateway's own freshness bound applies, see services/gateway/directory.py).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("hmi.store.followers")
MAX_FOLLOWERS = 1024


@dataclass
class Follower:
    acked: int = 0                 # the caller has applied every change up to this revision
    last_seen: float = 0.0         # monotonic; request arrival or reply
    polling: int = 0               # long polls held now


class ChangeFollowers:
    def __init__(self, *, max_wait: float = 2.0, live_seconds: float = 1.0, max_polls: int = 16) -> None:
        self.max_wait = max_wait
        self.live_seconds = live_seconds
        self.max_polls = max_polls            # long polls held at once (each holds one of the store's 32 RPC threads;
                                              # beyond, polls are answered at once and their gateways poll at intervals)
        self.revision = 0                     # latest committed revision
        self._followers: dict[str, Follower] = {}
        self._polls = 0
        self._cond = threading.Condition()
        self._closed = False

    def committed(self, revision: int) -> None:
        """A write committed this revision (LMDB layout's on_commit hook)."""
        with self._cond:
            self.revision = max(self.revision, revision)
            self._cond.notify_all()

    def poll(self, follower: str, after: int, wait: float, latest: int) -> None:
        """Notes that `follower` applied everything up to `after`; with `wait` > 0 and nothing newer than
        `after`, blocks until a change commits or `wait` passes."""
        with self._cond:
            self.revision = max(self.revision, latest)
            entry = self._note(follower, after) if follower else None
            if wait <= 0 or self.revision > after or self._polls >= self.max_polls or self._closed:
                return
            self._polls += 1
            if entry is not None:
                entry.polling += 1
            try:
                self._cond.wait_for(lambda: self.revision > after or self._closed, timeout=wait)
            finally:
                self._polls -= 1
                if entry is not None:
                    entry.polling -= 1
                    entry.last_seen = time.monotonic()

    def _note(self, follower: str, after: int) -> Follower:
        entry = self._followers.get(follower)
        if entry is None:
            if len(self._followers) >= MAX_FOLLOWERS:
                self._forget_dead()
            entry = self._followers[follower] = Follower()
        entry.acked = after
        entry.last_seen = time.monotonic()
        self._cond.notify_all()
        return entry

    def _forget_dead(self) -> None:
        now = time.monotonic()
        for name in [n for n, f in self._followers.items() if not self._live(f, now)]:
            del self._followers[name]

    def _live(self, entry: Follower, now: float) -> bool:
        return entry.polling > 0 or now - entry.last_seen < self.live_seconds

    def wait_for(self, revision: int) -> list[str]:
        """Blocks until every live follower has applied `revision` (at most `max_wait`); returns the laggards."""
        if self.max_wait <= 0:
            return []
        deadline = time.monotonic() + self.max_wait
        with self._cond:
            while True:
                now = time.monotonic()
                behind = [n for n, f in self._followers.items() if f.acked < revision and self._live(f, now)]
                if not behind or now >= deadline or self._closed:
                    break
                self._cond.wait(timeout=min(deadline - now, 0.05))
        if behind:
            log.warning("write at revision %d returned before follower(s) %s read it (waited %.1fs)", revision,
                        ", ".join(behind[:4]), self.max_wait)
        return behind

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
