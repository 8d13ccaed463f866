"""The adapter-training loop, one optimizer step at a time: AdamW with a linearly decaying rate over shuffled
batches. Offline training (`hmi tenant train`) runs it to the end in one go; compute's co-served fine-tuning
runs it a step at a time between inference batches, in micro-batches of bounded size whose gradients add up to
the whole batch's, and checkpoints it so a job resumes on another replica where it stopped. One loop for both,
so a co-served job learns what an offline run with the same data and seed learns.

A checkpoint is safetensors (tensors only, never a pickle): the parameters, AdamW's moments and the step."""
from __future__ import annotations

import json
import math
import random
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from hmi_errors import InvalidArgument

CHECKPOINT_FORMAT = "hmi-training-checkpoint-1"
Progress = Callable[[int, int, float], None]   # (step, total steps, loss)


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.0
    seed: int = 0
    max_steps: int = 0               # 0: epochs decide


class TrainingLoop:
    def __init__(self, parameters: list[torch.nn.Parameter], items: Sequence, settings: LoopSettings) -> None:
        if not items:
            raise InvalidArgument("no training examples")
        self.parameters = parameters
        self.items = items
        self.settings = settings
        self.per_epoch = math.ceil(len(items) / settings.batch_size)
        self.total = self.per_epoch * settings.epochs
        if settings.max_steps:
            self.total = min(self.total, settings.max_steps)
        self.optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._rate)
        self.step = 0
        self.loss = float("nan")
        self._rng = random.Random(settings.seed)
        self._order = list(range(len(items)))
        self._epoch = -1                 # the epoch `_order` is shuffled for

    def _rate(self, step: int) -> float:
        return 1 - step / max(1, self.total)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def batch(self) -> list:
        """The next step's examples: the same shuffles, in the same order, as an uninterrupted run."""
        epoch, index = divmod(self.step, self.per_epoch)
        while self._epoch < epoch:
            self._rng.shuffle(self._order)
            self._epoch += 1
        start = index * self.settings.batch_size
        return [self.items[i] for i in self._order[start:start + self.settings.batch_size]]

    def run_step(self, loss_of: Callable[[list], torch.Tensor],
                 split: Callable[[list], list[list]] = lambda batch: [batch],
                 before_part: Callable[[], None] = lambda: None) -> float:
        """One optimizer step over the next batch. `loss_of` gives a part's mean loss; parts (`split`) are
        weighted by their share of the batch, so their gradients sum to the whole batch's. `before_part` runs
        before each part (co-serving waits there for inference)."""
        batch = self.batch()
        self.optimizer.zero_grad()
        total = 0.0
        for part in (p for p in split(batch) if p):
            before_part()
            loss = loss_of(part) * (len(part) / len(batch))
            loss.backward()
            total += float(loss.detach())
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.loss = total
        return total

    def run(self, loss_of: Callable[[list], torch.Tensor], progress: Progress | None = None) -> float:
        while not self.done:
            self.run_step(loss_of)
            if progress is not None:
                progress(self.step, self.total, self.loss)
        return self.loss

    # ---- checkpoints ---------------------------------------------------------------------------

    def checkpoint(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {}
        for i, parameter in enumerate(self.parameters):
            tensors[f"param.{i}"] = parameter.detach().contiguous().clone()
            state = self.optimizer.state.get(parameter)
            if state:
                tensors[f"exp_avg.{i}"] = state["exp_avg"].contiguous().clone()
                tensors[f"exp_avg_sq.{i}"] = state["exp_avg_sq"].contiguous().clone()
        return save_tensors(tensors, metadata={"format": CHECKPOINT_FORMAT, "step": str(self.step),
                                               "loss": repr(self.loss), "parameters": str(len(self.parameters))})

    def restore(self, data: bytes) -> None:
        """Continues from a checkpoint of the same job (same parameters, data and settings)."""
        metadata = _metadata(data)
        if metadata.get("format") != CHECKPOINT_FORMAT or int(metadata.get("parameters", -1)) != len(self.parameters):
            raise InvalidArgument("the checkpoint is not one of this job's (format or parameter count differs)")
        tensors = load_tensors(data)
        step = int(metadata["step"])
        with torch.no_grad():
            for i, parameter in enumerate(self.parameters):
                saved = tensors[f"param.{i}"]
                if saved.shape != parameter.shape:
                    raise InvalidArgument(f"checkpoint parameter {i} has shape {tuple(saved.shape)}, the job's "
                                          f"{tuple(parameter.shape)}")
                parameter.copy_(saved)
                if f"exp_avg.{i}" in tensors:
                    self.optimizer.state[parameter] = {"step": torch.tensor(float(step)),
                                                       "exp_avg": tensors[f"exp_avg.{i}"].clone(),
                                                       "exp_avg_sq": tensors[f"exp_avg_sq.{i}"].clone()}
        self.step = step
        self.loss = float(metadata.get("loss", "nan"))
        self.scheduler.last_epoch = step
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self._rate(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's metadata (8 bytes of header length, then the JSON header)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
    except (struct.error, ValueError):
        raise InvalidArgument("the checkpoint is not a safetensors file") from None
    return header.get("__metadata__") or {}
