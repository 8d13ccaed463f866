"""Distils a domain bridge (models/bridge.py) on the domain's corpus.

Teacher: the lower model's true layer-L states of each corpus sequence (what the full model's layer L
receives). Student: the bridge applied to the PLOT rows that serving looks up for the same sequence. The
loss is their mean squared error per hidden unit over every token; a few sequences are held out to
report it before and after. Targets and rows are computed once (capped by `max_tokens_total`) and packed
once into the batches the training takes (sequences of similar length together, so little is padded; the
batches' order is shuffled every pass). The bridge trains with AdamW:

- `steps` > 0: exactly that many steps, the rate warming up then decaying linearly to zero;
- automatic (`steps` 0, the default): `passes` over the corpus, at most `max_steps`, the same schedule;
- automatic with `early_stopping`: at the full rate until the error on a second set of left-out
  sequences (the stopping set, never the reported one) stops improving, then a short cool-down to zero,
  at most `passes` over the corpus and `max_steps` steps; the best bridge on the stopping set is kept.
  Faster, but on SST-2's whole corpus its bridge was a little worse and its tenants lower, so it is off
  by default.

Deterministic for a seed. Measured on a 5,000-line SST-2 corpus (docs/performance.md, "Domain builds").
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from models.bridge import BridgeShape, DomainBridge, serialize_bridge
from services.common.errors import InvalidArgument

Progress = Callable[[str, int, int, float], None]   # (phase, done, total, loss)
HELD_OUT = 256          # sequences kept out to report the error before and after
STOPPING = 256          # sequences kept out to decide when to stop (automatic steps with early stopping)
EVAL_CHUNK = 64         # held-out sequences per evaluation batch
REPORT_SECONDS = 0.5    # progress reports at most this often (and at the last step)
LOG_SECONDS = 30.0
log = logging.getLogger("hmi.store")


@dataclass
class DistillSettings:
    steps: int = 0                      # 0: automatic: `passes` over the corpus, at most `max_steps` (with
                                        # early_stopping: until the stopping set's error stops improving);
                                        # > 0: exactly this many steps
    passes: int = 30
    max_steps: int = 4000
    batch_size: int = 64                # 32 with early stopping built a bridge faster but a little worse on
                                        # SST-2's whole corpus (held-out 0.0455 against 0.043) and its tenants
                                        # 0.8331 +- 0.0073 against 0.8459 +- 0.0095: docs/performance.md
    learning_rate: float = 3e-3
    heads: int = 4
    head_dim: int = 32
    ffn: int = 0                        # 0: the model's hidden size
    max_tokens_total: int = 400_000     # corpus tokens kept as targets and rows (fp16: 4 x hidden bytes each;
                                        # MiniLM: 600 MiB of store memory while it builds)
    seed: int = 0
    early_stopping: bool = False        # automatic steps only: stop once the stopping set's error improves by
    tolerance: float = 0.01             # less than this relative amount over `patience` checks in a row,
    patience: int = 3
    cooldown: float = 0.25              # then the rate decays to zero over this fraction of the steps run
    eval_every: int = 0                 # steps between checks (0: every pass over the corpus, 20..200 steps)
    threads: int = 1                    # torch threads of the distilling thread (0: leave torch's setting).
                                        # One: the steps are small, and a second thread on a shared machine
                                        # waits for a busy core at every operation (measured 5x slower)

    def validate(self) -> None:
        if not 0 <= self.steps <= 1_000_000:
            raise InvalidArgument(f"distillation steps {self.steps} outside 0..1000000 (0: automatic)")
        if not 1 <= self.batch_size <= 4096:
            raise InvalidArgument(f"distillation batch size {self.batch_size} outside 1..4096")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise InvalidArgument(f"distillation learning rate {self.learning_rate} outside (0, 1]")
        if not 1_000 <= self.max_tokens_total <= 100_000_000:
            raise InvalidArgument(f"distillation token cap {self.max_tokens_total} outside 1000..100000000")
        if not (1 <= self.passes <= 10_000 and 1 <= self.max_steps <= 1_000_000):
            raise InvalidArgument(f"distillation passes {self.passes} or step cap {self.max_steps} out of range")
        if not (math.isfinite(self.tolerance) and 0 <= self.tolerance < 1 and 1 <= self.patience <= 1000
                and 0 <= self.eval_every <= 1_000_000):
            raise InvalidArgument("distillation early stopping needs tolerance in [0, 1), patience 1..1000 and "
                                  "eval_every >= 0")
        if not (math.isfinite(self.cooldown) and 0 <= self.cooldown <= 10):
            raise InvalidArgument(f"distillation cool-down {self.cooldown} outside 0..10")
        if not 0 <= self.threads <= 1024:
            raise InvalidArgument(f"distillation threads {self.threads} outside 0..1024 (0: torch's setting)")

    def shape(self, hidden: int) -> BridgeShape:
        shape = BridgeShape(hidden=hidden, heads=self.heads, head_dim=self.head_dim, ffn=self.ffn or hidden)
        shape.validate()
        return shape


@dataclass
class DistillResult:
    weights: bytes
    shape: BridgeShape
    steps: int
    sequences: int
    tokens: int
    loss_before: float       # held-out MSE of the plain PLOT rows
    loss_after: float        # held-out MSE of the bridged rows
    seconds: float
    stopped_early: bool = False   # automatic steps: the stopping set's error stopped improving before the cap
    planned_steps: int = 0        # the cap (automatic) or the steps asked for


def pad_rows(arrays: Sequence[np.ndarray], hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(a) for a in arrays)
    out = torch.zeros(len(arrays), width, hidden)
    mask = torch.zeros(len(arrays), width, dtype=torch.bool)
    for i, array in enumerate(arrays):
        out[i, :len(array)] = torch.from_numpy(np.asarray(array, dtype=np.float32))
        mask[i, :len(array)] = True
    return out, mask


@dataclass
class PackedBatch:
    """Whole sequences packed once as the bridge takes them: rows and targets [tokens, H], the n+1 sequence
    `bounds` and every token's position. fp16 as computed (half the memory of the corpus's fp32 copy),
    widened per step in one torch call (exact, and under a millisecond for a batch)."""
    rows: torch.Tensor
    targets: torch.Tensor
    bounds: list[int]
    positions: torch.Tensor

    @classmethod
    def of(cls, rows: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> PackedBatch:
        lengths = [len(r) for r in rows]
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tolist()
        return cls(_packed(rows), _packed(targets), bounds, torch.cat([torch.arange(n) for n in lengths]))

    def mse(self, bridge: DomainBridge | None) -> torch.Tensor:
        rows = self.rows.float()
        out = rows if bridge is None else bridge(rows, self.bounds, self.positions)
        return ((out - self.targets.float()) ** 2).mean()


def _packed(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """One [tokens, H] tensor: fp16 when every array is (the corpus's rows and states), else fp32."""
    packed = np.concatenate(arrays)
    return torch.from_numpy(packed if packed.dtype in (np.float16, np.float32) else packed.astype(np.float32))


@torch.no_grad()
def evaluate(bridge: DomainBridge | None, batches: list[PackedBatch]) -> float:
    """Mean of the evaluation batches' MSE (as the build has always reported it)."""
    if bridge is not None:
        bridge.eval()
    try:
        return float(np.mean([float(batch.mse(bridge)) for batch in batches]))
    finally:
        if bridge is not None:
            bridge.train()


@contextmanager
def torch_threads(threads: int):
    """`threads` torch threads for the calling thread while it distils (0: unchanged). Torch's OpenMP setting
    is per thread: a store job's own thread changes only itself."""
    previous = torch.get_num_threads()
    if threads and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


class RateSchedule:
    """The learning rate's factor per step: a linear warm-up over the first 5 % of `steps`, then

    - without `cooldown` (a set number of steps, or no early stopping): a linear decay to zero at `steps`;
    - with it: the full rate until `plateau(step)` (the stopping set's error stopped improving), or at the
      latest until `steps / (1 + cooldown)`, then a linear decay to zero over `cooldown` x the steps run so
      far (a run of one rate then its cool-down ends about as well as a whole linear decay of that length),
      after which the distillation stops (`end`)."""

    def __init__(self, steps: int, cooldown: float | None = None) -> None:
        self.steps = steps
        self.warmup = max(1, steps // 20)
        self.cooldown = cooldown
        self.decay_start: int | None = None
        self.end: int | None = None
        if cooldown is not None:
            self.latest = max(self.warmup, int(steps / (1 + cooldown)))

    @property
    def last(self) -> int:
        """The step the distillation ends at: `steps`, or the end of the cool-down once it has begun."""
        return self.steps if self.end is None else self.end

    def plateau(self, step: int) -> None:
        self.decay_start = step
        self.end = min(self.steps, step + max(1, math.ceil(self.cooldown * step)))

    def factor(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        if self.cooldown is None:
            return warm * max(0.0, 1 - step / self.steps)
        if self.decay_start is None and step >= self.latest:
            self.decay_start, self.end = step, self.steps
        if self.decay_start is None:
            return warm
        return warm * max(0.0, 1 - (step - self.decay_start) / max(1, self.end - self.decay_start))


def split(count: int, seed: int, stopping: bool) -> tuple[random.Random, list[int], list[int], list[int]]:
    """(rng, held-out, stopping set, training sequences): the held-out set as it has always been drawn."""
    rng = random.Random(seed)
    order = list(range(count))
    rng.shuffle(order)
    held = order[:min(HELD_OUT, max(1, count // 10))]
    rest = order[len(held):]
    stop = rest[:min(STOPPING, len(rest) // 10)] if stopping else []
    return rng, held, stop, rest[len(stop):]


def distill(rows: list[np.ndarray], targets: list[np.ndarray], hidden: int, settings: DistillSettings,
            progress: Progress | None = None, *, release: bool = False) -> DistillResult:
    """rows / targets: per corpus sequence, fp16 [T, H] PLOT rows as served and true layer-L states.

    `release`: set each entry of the two lists to None once it is packed, so that a caller that keeps no
    other reference (the store) holds the corpus's rows once, not twice, while the bridge trains."""
    settings.validate()
    if len(rows) != len(targets) or any(len(r) != len(t) for r, t in zip(rows, targets)):
        raise ValueError("rows and targets must pair up sequence by sequence")
    if len(rows) < 2:
        raise InvalidArgument("distillation needs a corpus of at least 2 non-empty lines")
    with torch_threads(settings.threads):
        return _distill(rows, targets, hidden, settings, progress, release)


class StoppingSet:
    """Early stopping's judge: the error on sequences left out of training (not the reported held-out ones),
    checked every few steps; the best bridge seen on it is kept."""

    def __init__(self, batches: list[PackedBatch], tolerance: float, patience: int) -> None:
        self.batches = batches
        self.tolerance = tolerance
        self.patience = patience
        self.best = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.since_best = 0

    def check(self, bridge: DomainBridge) -> bool:
        """True once the error has not improved by `tolerance` (relative) for `patience` checks in a row."""
        error = evaluate(bridge, self.batches)
        self.since_best = 0 if error < self.best * (1 - self.tolerance) else self.since_best + 1
        if error < self.best:
            self.best = error
            self.best_state = {name: value.detach().clone() for name, value in bridge.state_dict().items()}
        return self.since_best >= self.patience


def _distill(rows: list[np.ndarray], targets: list[np.ndarray], hidden: int, settings: DistillSettings,
             progress: Progress | None, release: bool) -> DistillResult:
    started = time.time()
    lengths = [len(r) for r in rows]

    def pack(indices: list[int]) -> PackedBatch:
        batch = PackedBatch.of([rows[i] for i in indices], [targets[i] for i in indices])
        if release:
            for i in indices:
                rows[i] = targets[i] = None
        return batch

    def pack_chunks(indices: list[int]) -> list[PackedBatch]:
        return [pack(indices[s:s + EVAL_CHUNK]) for s in range(0, len(indices), EVAL_CHUNK)]

    torch.manual_seed(settings.seed)
    rng, held, stop, train = split(len(rows), settings.seed, settings.steps == 0 and settings.early_stopping)
    shape = settings.shape(hidden)
    bridge = DomainBridge(shape)
    batches_per_pass = math.ceil(len(train) / settings.batch_size)
    steps = settings.steps or max(1, min(settings.max_steps, settings.passes * batches_per_pass))
    held_batches = pack_chunks(held)
    before = evaluate(None, held_batches)
    watch = StoppingSet(pack_chunks(stop), settings.tolerance, settings.patience) if stop else None
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    rate = RateSchedule(steps, cooldown=settings.cooldown if watch else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate.factor)
    # Batches of similar length waste little on padding; their order is shuffled every pass. Each is packed
    # once, here, not at every step.
    by_length = sorted(train, key=lambda i: (lengths[i], rng.random()))
    batches = [pack(by_length[s:s + settings.batch_size]) for s in range(0, len(by_length), settings.batch_size)]
    check_every = settings.eval_every or min(200, max(20, batches_per_pass))
    step, running = 0, []
    reported = logged = time.time()
    if progress is not None:      # packed: the steps begin (their bar's rate, hence its ETA, starts here)
        progress("distilling", 0, rate.last, 0.0)
    bridge.train()
    while step < rate.last:
        rng.shuffle(batches)
        for batch in batches:
            if step >= rate.last:
                break
            loss = batch.mse(bridge)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running.append(float(loss.detach()))
            if watch is not None and (step % check_every == 0 or step == rate.last):
                if watch.check(bridge) and rate.decay_start is None:
                    rate.plateau(step)     # the rate now decays to zero, then the distillation stops
            now = time.time()
            if progress is not None and (now - reported >= REPORT_SECONDS or step == rate.last):
                reported = now     # total: the cap, an upper bound, until a plateau fixes the end
                progress("distilling", step, rate.last, float(np.mean(running[-20:])))
            if now - logged >= LOG_SECONDS:
                logged = now
                per_second = step / max(now - started, 1e-9)
                log.info("distilling the bridge: step %d of %s %d, %.1f steps/s, loss %.4f, %.0fs left at most",
                         step, "at most" if rate.end is None else "", rate.last, per_second,
                         float(np.mean(running[-20:])), (rate.last - step) / per_second)
    if watch is not None and watch.best_state is not None:
        bridge.load_state_dict(watch.best_state)
    bridge.eval()
    after = evaluate(bridge, held_batches)
    return DistillResult(weights=serialize_bridge(bridge), shape=shape, steps=step, sequences=len(rows),
                         tokens=int(sum(lengths)), loss_before=before, loss_after=after,
                         seconds=time.time() - started, stopped_early=step < steps, planned_steps=steps)
