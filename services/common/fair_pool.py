"""A thread pool that takes waiting calls in turn across callers, not in arrival order.

gRPC Python queues every call's handler on one thread pool; `concurrent.futures.ThreadPoolExecutor` runs them
first come, first served, so when one client floods a server with calls, another client's call waits behind
the whole backlog before any quota or fair queue of ours sees it (and a refusal costs nearly as much thread
time as an answer). Here every submitted call belongs to a *flow* (the caller's credential, else its
connection) and idle threads take the oldest call of the next flow in round-robin order: a caller with one
call waiting is served after at most one call of each other caller with calls waiting.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from concurrent import futures
from typing import Any, Callable, Hashable

_ANONYMOUS = "anonymous"


def call_flow(args: tuple) -> Hashable:
    """The flow of a call gRPC hands the pool: a digest of its `authorization` metadata, else its peer (each
    connection apart), else one shared flow."""
    for arg in args[:6]:
        metadata = getattr(arg, "invocation_metadata", None)
        if metadata is None:
            continue
        for key, value in metadata:
            if key == "authorization":
                raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
                return hashlib.blake2b(raw[:4096], digest_size=8).digest()
        call = getattr(arg, "call", None)
        try:
            return call.peer() if call is not None else _ANONYMOUS
        except Exception:  # noqa: BLE001 - a call already gone still gets a flow
            return _ANONYMOUS
    return _ANONYMOUS


class _Item:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: futures.Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as error:  # noqa: BLE001 - handed to the future, as ThreadPoolExecutor does
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class FairThreadPool(futures.Executor):
    """`max_workers` threads (started as calls arrive) over per-flow queues served round-robin."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "rpc",
                 flow_of: Callable[[tuple], Hashable] = call_flow) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._flow_of = flow_of
        self._flows: OrderedDict[Hashable, deque[_Item]] = OrderedDict()   # next flow to serve first
        self._pending = 0
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._shutdown = False
        self._condition = threading.Condition()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def flows(self) -> int:
        return len(self._flows)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> futures.Future:
        flow = self._flow_of(args)
        future: futures.Future = futures.Future()
        with self._condition:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            queue = self._flows.get(flow)
            if queue is None:
                queue = self._flows[flow] = deque()
            queue.append(_Item(future, fn, args, kwargs))
            self._pending += 1
            if self._pending > self._idle and len(self._threads) < self._max_workers:
                thread = threading.Thread(target=self._work, name=f"{self._prefix}_{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._condition.notify()
        return future

    def _next(self) -> _Item | None:
        with self._condition:
            while self._pending == 0:
                if self._shutdown:
                    return None
                self._idle += 1
                self._condition.wait()
                self._idle -= 1
            flow, queue = next(iter(self._flows.items()))
            item = queue.popleft()
            if queue:
                self._flows.move_to_end(flow)     # its next call after one of every other flow's
            else:
                del self._flows[flow]
            self._pending -= 1
            return item

    def _work(self) -> None:
        while (item := self._next()) is not None:
            item.run()
            del item

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._condition:
            self._shutdown = True
            if cancel_futures:
                for queue in self._flows.values():
                    for item in queue:
                        item.future.cancel()
                self._flows.clear()
                self._pending = 0
            self._condition.notify_all()
        if wait:
            for thread in list(self._threads):
                if thread is not threading.current_thread():
                    thread.join()
