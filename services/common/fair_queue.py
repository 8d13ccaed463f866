"""Fair queuing across tenants, shared by the gateway's batcher and compute's generation queue.

Start-time fair queuing (Goyal et al., 1996) by cost (tokens): each tenant is a flow; an item's start tag is
max(virtual time, the finish tag of its flow's previous item), its finish tag start + cost / weight, and the
queue serves the item with the smallest start tag, moving virtual time to it. A tenant that sends little gets
tags at the current virtual time and is served next, whatever another tenant has queued: a flood delays a
light tenant by at most one item of each other backlogged flow, never by the flood's length. Weights give
shares: a flow of weight 2 gets twice the tokens of a flow of weight 1 while both are backlogged. Within a
flow, items keep their order.

Not thread-safe: its owner holds its own lock."""
from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Iterator, TypeVar

T = TypeVar("T")


@dataclass
class _Flow(Generic[T]):
    items: deque = field(default_factory=deque)      # (start tag, cost, item)
    finish: float = 0.0                               # finish tag of the last item pushed
    cost: float = 0.0                                 # of the items queued


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._flows: dict[Hashable, _Flow[T]] = {}
        self._heads: list[tuple[float, int, Hashable]] = []   # per non-empty flow: its head's tag (+ stale ones)
        self._head_entry: dict[Hashable, int] = {}           # flow -> the order number of its valid heap entry
        self._order = itertools.count()
        self._virtual = 0.0
        self._length = 0
        self._cost = 0.0

    def __len__(self) -> int:
        return self._length

    @property
    def cost(self) -> float:
        """Summed cost of the queued items."""
        return self._cost

    def flow_length(self, flow: Hashable) -> int:
        found = self._flows.get(flow)
        return len(found.items) if found is not None else 0

    def flow_cost(self, flow: Hashable) -> float:
        """Summed cost of one flow's queued items."""
        found = self._flows.get(flow)
        return found.cost if found is not None else 0.0

    @property
    def backlogged(self) -> int:
        """Flows with items queued."""
        return len(self._head_entry)

    def push(self, flow: Hashable, item: T, cost: float, weight: float = 1.0) -> None:
        state = self._flows.get(flow)
        if state is None:
            state = self._flows[flow] = _Flow()
        weight = weight if math.isfinite(weight) and weight > 0 else 1.0     # a bad weight is the default one
        cost = cost if math.isfinite(cost) and cost > 0 else 1e-9
        start = max(self._virtual, state.finish)
        state.finish = start + cost / weight
        if not state.items:
            self._push_head(flow, start)
        state.items.append((start, cost, item))
        state.cost += cost
        self._length += 1
        self._cost += cost

    def _push_head(self, flow: Hashable, tag: float) -> None:
        order = next(self._order)
        self._head_entry[flow] = order
        heapq.heappush(self._heads, (tag, order, flow))

    def _drop_stale(self) -> None:
        """Heap entries left behind by `pop_flow` are dropped when they reach the top."""
        while self._heads and self._head_entry.get(self._heads[0][2]) != self._heads[0][1]:
            heapq.heappop(self._heads)

    def peek(self) -> T | None:
        """The item `pop` would return."""
        self._drop_stale()
        if not self._heads:
            return None
        return self._flows[self._heads[0][2]].items[0][2]

    def pop(self) -> T | None:
        self._drop_stale()
        if not self._heads:
            return None
        _, _, flow = heapq.heappop(self._heads)
        return self._take_head(flow)

    def pop_flow(self, flow: Hashable) -> T | None:
        """The head item of one flow, out of fair order (the caller serves that flow by a rule of its own);
        it advances virtual time like any served item."""
        state = self._flows.get(flow)
        if state is None or not state.items:
            return None
        return self._take_head(flow)

    def _take_head(self, flow: Hashable) -> T:
        state = self._flows[flow]
        self._head_entry.pop(flow, None)
        start, cost, item = state.items.popleft()
        state.cost -= cost
        self._length -= 1
        self._cost -= cost
        self._virtual = max(self._virtual, start)
        if state.items:
            self._push_head(flow, state.items[0][0])
        elif state.finish <= self._virtual:
            del self._flows[flow]           # idle and owed nothing: forget it (bounded by active tenants)
        if len(self._flows) > 4 * (len(self._head_entry) + 64):
            self._forget_idle()
        return item

    def remove_where(self, drop: Callable[[T], bool]) -> list[T]:
        """Removes (and returns) the items for which `drop` is true; the rest keep their tags and order."""
        removed: list[T] = []
        for state in self._flows.values():
            kept = deque()
            for entry in state.items:
                if drop(entry[2]):
                    removed.append(entry[2])
                    state.cost -= entry[1]
                    self._cost -= entry[1]
                    self._length -= 1
                else:
                    kept.append(entry)
            state.items = kept
        if removed:
            self._heads, self._head_entry = [], {}
            for flow, state in self._flows.items():
                if state.items:
                    self._push_head(flow, state.items[0][0])
        return removed

    def __iter__(self) -> Iterator[T]:
        """The queued items, flow by flow (not in service order)."""
        for state in self._flows.values():
            for entry in state.items:
                yield entry[2]

    def _forget_idle(self) -> None:
        for flow in [f for f, state in self._flows.items() if not state.items and state.finish <= self._virtual]:
            del self._flows[flow]
