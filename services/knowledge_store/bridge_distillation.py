"""Distils a domain bridge (models/bridge.py) on the domain's corpus.

Teacher: the lower model's true layer-L states of each corpus sequence (what the full model's layer L
receives). Student: the bridge applied to the PLOT rows that serving looks up for the same sequence. The
loss is their mean squared error per hidden unit over every token; a few sequences are held out to
report it before and after. Targets and rows are computed once (capped by `max_tokens_total`), then the
bridge trains for `steps` AdamW steps with a linearly decaying rate. Deterministic for a seed.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.bridge import BridgeShape, DomainBridge, serialize_bridge
from services.common.errors import InvalidArgument

Progress = Callable[[str, int, int, float], None]   # (phase, done, total, loss)
HELD_OUT = 256


@dataclass
class DistillSettings:
    steps: int = 0                      # 0: `passes` over the corpus, at most `max_steps`
    passes: int = 30
    max_steps: int = 4000
    batch_size: int = 64
    learning_rate: float = 3e-3
    heads: int = 4
    head_dim: int = 32
    ffn: int = 0                        # 0: the model's hidden size
    max_tokens_total: int = 400_000     # corpus tokens kept as targets and rows (fp16: 4 x hidden bytes each;
                                        # MiniLM: 600 MiB of store memory while it builds)
    seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.steps <= 1_000_000:
            raise InvalidArgument(f"distillation steps {self.steps} outside 0..1000000 (0: automatic)")
        if not 1 <= self.batch_size <= 4096:
            raise InvalidArgument(f"distillation batch size {self.batch_size} outside 1..4096")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise InvalidArgument(f"distillation learning rate {self.learning_rate} outside (0, 1]")
        if not 1_000 <= self.max_tokens_total <= 100_000_000:
            raise InvalidArgument(f"distillation token cap {self.max_tokens_total} outside 1000..100000000")

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


def pad_rows(arrays: Sequence[np.ndarray], hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(a) for a in arrays)
    out = torch.zeros(len(arrays), width, hidden)
    mask = torch.zeros(len(arrays), width, dtype=torch.bool)
    for i, array in enumerate(arrays):
        out[i, :len(array)] = torch.from_numpy(np.asarray(array, dtype=np.float32))
        mask[i, :len(array)] = True
    return out, mask


def _mse(bridge: DomainBridge | None, rows: list[np.ndarray], targets: list[np.ndarray], hidden: int) -> torch.Tensor:
    lengths = [len(r) for r in rows]
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    packed = torch.from_numpy(np.concatenate(rows).astype(np.float32))
    positions = torch.cat([torch.arange(n) for n in lengths])
    out = packed if bridge is None else bridge(packed, bounds, positions)
    target = torch.from_numpy(np.concatenate(targets).astype(np.float32))
    return ((out - target) ** 2).mean()


def distill(rows: list[np.ndarray], targets: list[np.ndarray], hidden: int, settings: DistillSettings,
            progress: Progress | None = None) -> DistillResult:
    """rows / targets: per corpus sequence, fp16 [T, H] PLOT rows as served and true layer-L states."""
    settings.validate()
    if len(rows) != len(targets) or any(len(r) != len(t) for r, t in zip(rows, targets)):
        raise ValueError("rows and targets must pair up sequence by sequence")
    if len(rows) < 2:
        raise InvalidArgument("distillation needs a corpus of at least 2 non-empty lines")
    started = time.time()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    held = order[:min(HELD_OUT, max(1, len(order) // 10))]
    train = order[len(held):]
    shape = settings.shape(hidden)
    bridge = DomainBridge(shape)
    steps = settings.steps or max(1, min(settings.max_steps, settings.passes * math.ceil(len(train) /
                                                                                       settings.batch_size)))
    evaluate = lambda model: float(np.mean([  # noqa: E731
        float(_mse(model, [rows[i] for i in held[s:s + 64]], [targets[i] for i in held[s:s + 64]], hidden))
        for s in range(0, len(held), 64)]))
    with torch.no_grad():
        before = evaluate(None)
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(0.0, 1 - step / steps))
    # Batches of similar length waste little on padding; their order is shuffled every pass.
    by_length = sorted(train, key=lambda i: (len(rows[i]), rng.random()))
    batches = [by_length[s:s + settings.batch_size] for s in range(0, len(by_length), settings.batch_size)]
    step, running = 0, []
    bridge.train()
    while step < steps:
        rng.shuffle(batches)
        for batch in batches:
            if step >= steps:
                break
            loss = _mse(bridge, [rows[i] for i in batch], [targets[i] for i in batch], hidden)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            running.append(float(loss.detach()))
            if progress is not None and (step % 20 == 0 or step == steps):
                progress("distilling", step, steps, float(np.mean(running[-20:])))
    bridge.eval()
    with torch.no_grad():
        after = evaluate(bridge)
    return DistillResult(weights=serialize_bridge(bridge), shape=shape, steps=step, sequences=len(rows),
                         tokens=int(sum(len(r) for r in rows)), loss_before=before, loss_after=after,
                         seconds=time.time() - started)
