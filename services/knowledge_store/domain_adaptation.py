"""Domain-adapted lower models: continued masked-language-model pretraining of layers [0, L).

The whole base model runs (the upper layers frozen, as every tenant shares them), so the adapted lower
layers keep producing states the shared upper layers understand. The packaged MiniLM has no MLM head,
so one is built tied to the input embeddings (logits = transform(h) · Eᵀ + b); it is trained alone for
the first steps, then with the lower layers. Embeddings stay frozen (the head is tied to them).

The result is the lower layers' weights as safetensors bytes, stored per domain; the report compares
held-out masked-token loss of the base and the adapted lower layers under the same trained head.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from models.lower import pad_batch, with_layers
from services.common.errors import InvalidArgument

Progress = Callable[[str, int, int, float], None]
MASK_PROBABILITY = 0.15
HELD_OUT_SEQUENCES = 64


@dataclass
class AdaptSettings:
    split_layer: int
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    max_tokens: int = 128
    seed: int = 0


@dataclass
class AdaptResult:
    weights: bytes          # safetensors: encoder.layer.{i}.* for i < L
    steps: int
    corpus_sequences: int
    base_loss: float
    adapted_loss: float
    seconds: float


class TiedMaskedLMHead(torch.nn.Module):
    def __init__(self, embeddings: torch.nn.Embedding) -> None:
        super().__init__()
        hidden = embeddings.weight.shape[1]
        self.embeddings = embeddings
        self.transform = torch.nn.Linear(hidden, hidden)
        with torch.no_grad():
            self.transform.weight.copy_(torch.eye(hidden))
            self.transform.bias.zero_()
        self.norm = torch.nn.LayerNorm(hidden)
        self.bias = torch.nn.Parameter(torch.zeros(embeddings.weight.shape[0]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.transform(hidden))), self.embeddings.weight, self.bias)


def lower_layer_keys(split_layer: int, model) -> list[str]:
    return [f"encoder.layer.{i}.{name}" for i in range(split_layer)
            for name, _ in model.encoder.layer[i].named_parameters()]


def export_lower_layers(model, split_layer: int) -> bytes:
    state = model.state_dict()
    return save_safetensors({key: state[key].contiguous() for key in lower_layer_keys(split_layer, model)},
                            metadata={"format": "hmi-lower-model", "split_layer": str(split_layer)})


def with_lower_layers(base_model, weights: bytes):
    """A copy of the base model whose lower layers are the stored domain-adapted ones (upper layers shared)."""
    tensors = load_safetensors(weights)
    layers = list(base_model.encoder.layer)
    split_layer = len({key.split(".")[2] for key in tensors})
    for index in range(split_layer):
        layer = copy.deepcopy(layers[index])
        prefix = f"encoder.layer.{index}."
        layer.load_state_dict({key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)})
        layers[index] = layer
    return with_layers(base_model, layers)


def _mask(batch: list[list[int]], special: set[int], mask_id: int, vocab: int, generator: torch.Generator):
    input_ids, attention = pad_batch(batch)
    maskable = attention.bool() & ~torch.isin(input_ids, torch.tensor(sorted(special)))
    chosen = (torch.rand(input_ids.shape, generator=generator) < MASK_PROBABILITY) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = mask_id
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[swap] = torch.randint(vocab, (int(swap.sum()),), generator=generator)
    return masked, attention, labels


def _loss(model, head, batch) -> torch.Tensor:
    input_ids, attention, labels = batch
    hidden = model(input_ids=input_ids, attention_mask=attention,
                   token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
    selected = labels != -100
    return F.cross_entropy(head(hidden[selected]), labels[selected])


def adapt_lower_layers(base_model, tokenizer, sequences: list[list[int]], settings: AdaptSettings,
                       progress: Progress | None = None) -> AdaptResult:
    """Trains a copy of the base model's lower layers; the base model is left untouched."""
    report = progress or (lambda stage, done, total, loss: None)
    layers = base_model.config.num_hidden_layers
    if not 1 <= settings.split_layer < layers:
        raise InvalidArgument(f"domain adaptation needs split layer in 1..{layers - 1}")
    if len(sequences) < 2:
        raise InvalidArgument("domain adaptation needs a corpus of at least 2 non-empty lines")
    mask_id = tokenizer.token_to_id("[MASK]")
    if mask_id is None:
        raise InvalidArgument("the base model's tokenizer has no [MASK] token: it cannot be MLM-adapted")
    special = {tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]")} - {None}
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)

    order = torch.randperm(len(sequences), generator=generator).tolist()
    held_out_count = min(HELD_OUT_SEQUENCES, len(sequences) // 5)
    held_out = [sequences[i] for i in order[:held_out_count]] or [sequences[order[0]]]
    training = [sequences[i] for i in order[held_out_count:]]
    vocab = base_model.config.vocab_size
    held_batches = [_mask(held_out[i:i + settings.batch_size], special, mask_id, vocab, generator)
                    for i in range(0, len(held_out), settings.batch_size)]

    model = copy.deepcopy(base_model).train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    lower = [p for i in range(settings.split_layer) for p in model.encoder.layer[i].parameters()]
    head = TiedMaskedLMHead(model.embeddings.word_embeddings)
    head_parameters = [p for name, p in head.named_parameters() if not name.startswith("embeddings.")]
    optimizer = torch.optim.AdamW([{"params": head_parameters, "lr": settings.head_learning_rate},
                                   {"params": lower, "lr": settings.learning_rate}], weight_decay=0.01)
    head_only_steps = max(1, settings.steps // 4)
    running = None
    cursor = 0
    for step in range(settings.steps):
        train_lower = step >= head_only_steps
        for parameter in lower:
            parameter.requires_grad_(train_lower)
        optimizer.param_groups[1]["lr"] = settings.learning_rate if train_lower else 0.0
        batch = []
        while len(batch) < settings.batch_size:
            batch.append(training[cursor % len(training)])
            cursor += 1
        loss = _loss(model, head, _mask(batch, special, mask_id, vocab, generator))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head_parameters + lower, 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        report("adapting", step + 1, settings.steps, running)

    model.eval()
    with torch.no_grad():
        adapted_loss = sum(_loss(model, head, b).item() for b in held_batches) / len(held_batches)
        base_loss = sum(_loss(base_model, head, b).item() for b in held_batches) / len(held_batches)
    return AdaptResult(weights=export_lower_layers(model, settings.split_layer), steps=settings.steps,
                       corpus_sequences=len(sequences), base_loss=base_loss, adapted_loss=adapted_loss,
                       seconds=time.perf_counter() - started)
