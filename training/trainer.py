"""Trains a tenant's LoRA adapter and head on PLOT outputs, through the very layer code compute serves with.

The inputs are what serving sees: layer-L vectors from the domain's PLOT (or embeddings when L = 0),
so the adapter learns to correct for PLOT's approximation. The base weights stay frozen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hmi_errors import InvalidArgument
from models.adapter_format import DEFAULT_TARGETS, Adapter, target_shape
from models.encoder import EncoderModel
from models.lora import LoRAWeights
from models.packing import PackedInputs, PackedLayout, pack_inputs, plot_rows
from training.training_loop import LoopSettings, Progress, TrainingLoop


@dataclass
class Example:
    token_ids: np.ndarray            # int32 [T]
    layer_input: np.ndarray | None   # fp16 [T, H] PLOT vectors (split layer > 0), None for L = 0
    label: int


@dataclass
class TrainSettings:
    split_layer: int
    num_labels: int
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0




def init_lora(dims, split_layer: int, rank: int, targets: tuple[str, ...], generator: torch.Generator
              ) -> tuple[dict[tuple[int, str], torch.nn.Parameter], dict[tuple[int, str], torch.nn.Parameter]]:
    """LoRA parameters on layers [L, N) as PEFT initialises them: A uniform, B zero (a no-op at first)."""
    lora_a: dict[tuple[int, str], torch.nn.Parameter] = {}
    lora_b: dict[tuple[int, str], torch.nn.Parameter] = {}
    for layer in range(split_layer, dims.layers):
        for target in targets:
            fan_in, fan_out = target_shape(target, dims)
            bound = 1 / math.sqrt(fan_in)
            a = (torch.rand(1, rank, fan_in, generator=generator) * 2 - 1) * bound
            lora_a[(layer, target)] = torch.nn.Parameter(a)
            lora_b[(layer, target)] = torch.nn.Parameter(torch.zeros(1, fan_out, rank))
    return lora_a, lora_b


def entry_states(model, split_layer: int, examples) -> tuple[PackedInputs, list[int]]:
    """What the upper layers take for a batch of one tenant's examples, packed as serving packs it (one LoRA
    segment, slot 0): embeddings at L = 0, else the PLOT rows the examples carry; and the sequences' lengths."""
    layout = PackedLayout.of([split_layer] * len(examples), [0] * len(examples),
                             [len(e.token_ids) for e in examples])
    plot = plot_rows(layout, lambda j: examples[layout.order[j]].layer_input)
    inputs = pack_inputs(layout, hidden_size=model.dims.hidden, device=model.device, embed=model.embed,
                         token_ids_of=lambda j: examples[layout.order[j]].token_ids, first_position_of=lambda j: 0,
                         plot=plot)
    return inputs, layout.lengths


def fit_batches(parameters: list[torch.nn.Parameter], items: list, loss_of: Callable[[list], torch.Tensor], *,
                epochs: int, batch_size: int, learning_rate: float, weight_decay: float = 0.0, seed: int = 0,
                max_steps: int = 0, progress: Progress | None = None) -> float:
    """AdamW with a linearly decaying rate over shuffled batches, for `epochs` (or `max_steps`); the last loss."""
    loop = TrainingLoop(parameters, items, LoopSettings(epochs, batch_size, learning_rate, weight_decay, seed,
                                                        max_steps))
    return loop.run(loss_of, progress)


class AdapterTrainer:
    def __init__(self, model: EncoderModel, settings: TrainSettings) -> None:
        if not 0 <= settings.split_layer < model.dims.layers:
            raise InvalidArgument(f"split layer {settings.split_layer} is outside 0..{model.dims.layers - 1}")
        self.model = model
        self.settings = settings
        for parameter in model.model.parameters():
            parameter.requires_grad_(False)
        generator = torch.Generator().manual_seed(settings.seed)
        self.lora_a, self.lora_b = init_lora(model.dims, settings.split_layer, settings.rank, settings.targets,
                                             generator)
        self.head = torch.nn.Linear(model.dims.hidden, settings.num_labels)
        torch.nn.init.normal_(self.head.weight, std=0.02, generator=generator)
        torch.nn.init.zeros_(self.head.bias)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.lora_a.values()) + list(self.lora_b.values()) + list(self.head.parameters())

    def logits(self, examples: list[Example]) -> torch.Tensor:
        """Packed forward of one batch of this tenant's examples: every token in one segment (slot 0)."""
        inputs, lengths = entry_states(self.model, self.settings.split_layer, examples)
        scaling = self.settings.alpha / self.settings.rank
        lora_b = {key: b * scaling for key, b in self.lora_b.items()}
        out = self.model.run(inputs, LoRAWeights(self.lora_a, lora_b))
        seq_index = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(lengths))
        pooled = torch.zeros(len(examples), out.shape[1]).index_add(0, seq_index, out)
        pooled = pooled / torch.tensor(lengths, dtype=torch.float32)[:, None]
        return self.head(pooled)

    def fit(self, train: list[Example], progress: Progress | None = None) -> float:
        if not train:
            raise InvalidArgument("no training examples")
        return fit_batches(self.parameters(), train, self.loss,
                           epochs=self.settings.epochs, batch_size=self.settings.batch_size,
                           learning_rate=self.settings.learning_rate, weight_decay=self.settings.weight_decay,
                           seed=self.settings.seed, progress=progress)

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """Mean cross-entropy of a batch (or of a part of one: co-serving trains in parts)."""
        return F.cross_entropy(self.logits(batch), torch.tensor([e.label for e in batch]))

    @torch.no_grad()
    def accuracy(self, examples: list[Example]) -> float:
        if not examples:
            return float("nan")
        correct = 0
        for start in range(0, len(examples), 64):
            batch = examples[start:start + 64]
            predicted = self.logits(batch).argmax(1)
            correct += int((predicted == torch.tensor([e.label for e in batch])).sum())
        return correct / len(examples)

    def adapter(self) -> Adapter:
        lora = {key: (self.lora_a[key][0].detach().clone(), self.lora_b[key][0].detach().clone())
                for key in self.lora_a}
        return Adapter(rank=self.settings.rank, alpha=self.settings.alpha, lora=lora,
                       head_weight=self.head.weight.detach().clone(), head_bias=self.head.bias.detach().clone(),
                       targets=tuple(self.settings.targets))
