"""A shared/exclusive lock: every LMDB transaction of the store holds it shared; growing the map holds it
exclusively, because LMDB may only remap while no transaction of the process is open."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class SharedLock:
    """Many holders share it; one holder excludes all. A thread that already holds it shared may take it
    shared again (a read nested in a write) without waiting, even while an exclusive holder waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._local = threading.local()

    def held_shared(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._exclusive or self._waiting:   # an exclusive holder waiting goes first
                    self._cond.wait()
                self._shared += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._shared -= 1
                    if self._shared == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if self.held_shared():
            raise RuntimeError("cannot take the lock exclusively while this thread holds it shared")
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
