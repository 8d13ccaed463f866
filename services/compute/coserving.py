"""Inference first, training in the time it leaves: the gate between a compute replica's serving and the
fine-tuning job it runs (tensor-free, so its rules are tested without a model).

Serving tells the gate when a batch (or a generation step's work) is queued for execution and when it ends.
Training runs in parts of at most `part_tokens` tokens and asks the gate before each part: a part starts only
while no inference work is queued or executing (or at most `beside` batches, on a CPU with a core to spare for
training), or once training has waited `max_wait` seconds (so a job still progresses under full load).
Inference never waits for the gate: at worst it shares the device with one part already started, so the delay
training adds to an inference batch is bounded by one part's time, which `part_tokens` sets
(`--train-part-tokens`)."""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


class CoServingGate:
    def __init__(self, max_wait: float = 2.0, busy: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic, beside: int = 0) -> None:
        self.max_wait = max_wait
        self.beside = beside         # inference batches a part may start beside (a CPU with a core to spare)
        self.busy = busy or (lambda: False)   # inference not counted by begin/end (a generation engine's)
        self._polled = busy is not None
        self.clock = clock
        self._inference = 0
        self._cond = threading.Condition()
        self.training_parts = 0
        self.forced_parts = 0        # parts that ran beside inference because training had waited max_wait

    def inference_begins(self) -> None:
        with self._cond:
            self._inference += 1

    def inference_ends(self) -> None:
        with self._cond:
            self._inference = max(0, self._inference - 1)
            if self._inference <= self.beside:
                self._cond.notify_all()

    def watch(self, busy: Callable[[], bool]) -> None:
        """Also yield while `busy()` (a generation engine with sequences running); polled every few ms."""
        self.busy, self._polled = busy, True

    def idle(self) -> bool:
        return self._inference <= self.beside and not self.busy()

    def training_turn(self, stop: threading.Event | None = None, poll: float = 0.002) -> bool:
        """Blocks until a training part may start; True when it starts on an idle device, False when forced by
        max_wait (or asked to stop)."""
        started = self.clock()
        with self._cond:
            while not self.idle():
                if stop is not None and stop.is_set():
                    return False
                waited = self.clock() - started
                if waited >= self.max_wait:
                    self.forced_parts += 1
                    self.training_parts += 1
                    return False
                # woken by inference_ends; a `busy` callable (generation) is not, so it is polled
                self._cond.wait(timeout=min(poll if self._polled else 0.25, self.max_wait - waited))
            self.training_parts += 1
            return True


def split_by_tokens(items: Sequence[T], tokens_of: Callable[[T], int], budget: int) -> list[list[T]]:
    """Consecutive parts of at most `budget` tokens (an item longer than the budget goes alone)."""
    parts: list[list[T]] = []
    current: list[T] = []
    used = 0
    for item in items:
        tokens = tokens_of(item)
        if current and used + tokens > budget:
            parts.append(current)
            current, used = [], 0
        current.append(item)
        used += tokens
    if current:
        parts.append(current)
    return parts
