"""Trains a generative tenant's LoRA (causal language modelling) on PLOT outputs, through the decoder
layer code compute serves with; the base weights stay frozen and there is no head (the base LM head
is shared). Inputs are what serving sees: the domain's PLOT rows of the text (or embeddings at L = 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hmi_errors import InvalidArgument
from models.adapter_format import Adapter
from models.decoder import DecoderModel
from models.lora import LoRAWeights
from training.trainer import Progress, entry_states, fit_batches, init_lora


@dataclass
class TextExample:
    token_ids: np.ndarray            # int32 [T], T >= 2
    layer_input: np.ndarray | None   # fp16 [T, H] PLOT rows (split layer > 0), None for L = 0
    learn_from: int = 1              # the first token whose prediction is learnt (a completion after its prompt)


@dataclass
class CausalTrainSettings:
    split_layer: int
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-3
    seed: int = 0
    max_steps: int = 0               # 0 = whole epochs


class CausalTrainer:
    def __init__(self, model: DecoderModel, settings: CausalTrainSettings) -> None:
        if not 0 <= settings.split_layer < model.dims.layers:
            raise InvalidArgument(f"split layer {settings.split_layer} is outside 0..{model.dims.layers - 1}")
        self.model = model
        self.settings = settings
        for parameter in model.model.parameters():
            parameter.requires_grad_(False)
        generator = torch.Generator().manual_seed(settings.seed)
        self.lora_a, self.lora_b = init_lora(model.dims, settings.split_layer, settings.rank, settings.targets,
                                             generator)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.lora_a.values()) + list(self.lora_b.values())

    def token_losses(self, examples: list[TextExample], with_adapter: bool = True) -> torch.Tensor:
        """Negative log-likelihood of every next token of every example (packed, one segment)."""
        logits, targets = self.next_token_logits(examples, with_adapter)
        return F.cross_entropy(logits, targets, reduction="none")

    def completion_loss(self, examples: list[TextExample]) -> torch.Tensor:
        """Mean NLL of the tokens from each example's `learn_from` on: a completion, not its prompt."""
        logits, targets = self.next_token_logits(examples)
        keep = torch.tensor([i + 1 >= e.learn_from for e in examples for i in range(len(e.token_ids) - 1)])
        return F.cross_entropy(logits[keep], targets[keep])

    def next_token_logits(self, examples: list[TextExample], with_adapter: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at every position that has a next token, and that token (packed in example order)."""
        inputs, lengths = entry_states(self.model, self.settings.split_layer, examples)
        bounds = inputs.bounds
        caches = [self.model.new_cache(self.settings.split_layer, n) for n in lengths]
        scaling = self.settings.alpha / self.settings.rank
        lora_a = self.lora_a if with_adapter else {}
        lora_b = {key: b * scaling for key, b in self.lora_b.items()} if with_adapter else {}
        logits = self.model.logits(self.model.run(inputs, caches, LoRAWeights(lora_a, lora_b)))
        targets = torch.from_numpy(np.concatenate([e.token_ids for e in examples]).astype(np.int64))
        predict = torch.tensor([p for start, end in zip(bounds[:-1], bounds[1:]) for p in range(start, end - 1)])
        return logits[predict], targets[predict + 1]

    def fit(self, train: list[TextExample], progress: Progress | None = None) -> float:
        if not train:
            raise InvalidArgument("no training text")
        return fit_batches(self.parameters(), train, lambda batch: self.token_losses(batch).mean(),
                           epochs=self.settings.epochs, batch_size=self.settings.batch_size,
                           learning_rate=self.settings.learning_rate, seed=self.settings.seed,
                           max_steps=self.settings.max_steps, progress=progress)

    @torch.no_grad()
    def perplexity(self, examples: list[TextExample], with_adapter: bool = True) -> float:
        """exp(mean next-token NLL) over every predicted token of `examples`."""
        if not examples:
            return float("nan")
        total, count = 0.0, 0
        for start in range(0, len(examples), 16):
            losses = self.token_losses(examples[start:start + 16], with_adapter)
            total += float(losses.sum())
            count += losses.numel()
        return math.exp(total / max(1, count))

    def adapter(self) -> Adapter:
        lora = {key: (self.lora_a[key][0].detach().clone(), self.lora_b[key][0].detach().clone())
                for key in self.lora_a}
        hidden = self.model.dims.hidden
        return Adapter(rank=self.settings.rank, alpha=self.settings.alpha, lora=lora,
                       head_weight=torch.zeros(0, hidden), head_bias=torch.zeros(0),
                       targets=tuple(self.settings.targets))
