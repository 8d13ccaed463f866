"""Study-only: a decoder domain's correction for PLOT, distilled from the full model.

The decoder counterpart of the encoder's domain bridge. A bridge that mixes the PLOT rows of a whole sequence
cannot run while a decoder generates (it would be one more attention layer per new token over everything
before it), so the correction here is a domain LoRA on the upper layers: trained once per domain, on the
domain's unlabeled text, so that the upper layers fed with PLOT rows reproduce the full model's next-token
distribution (KL divergence to the full model on every position). Tenants then train on top of it. Serving
would apply it as a second LoRA segment beside each tenant's adapter; it is measured here first
(`bench/perplexity.py --methods distill`), merged into a copy of the base weights, which computes the same.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.adapter_format import TARGETS, Adapter
from models.decoder import DecoderModel
from models.families import family
from models.lora_merge import merged_model
from training.causal_trainer import CausalTrainer, CausalTrainSettings, TextExample
from training.trainer import Progress, fit_batches


def every_projection(model: DecoderModel) -> tuple[str, ...]:
    """Every projection a LoRA can adapt in this model's layers (the gated MLP's gate exists in Llama only)."""
    return tuple(t for t in TARGETS if t in family(model.family).targets)


@dataclass
class DistillPair:
    teacher: TextExample      # token ids only: the full model embeds them (L = 0)
    student: TextExample      # the same tokens with the domain's PLOT rows at layer L


@dataclass
class DistillResult:
    adapter: Adapter
    kl_before: float          # held-out mean KL(full || PLOT + upper layers) per predicted token, nats
    kl_after: float
    steps: int


def distill_domain_lora(model: DecoderModel, split_layer: int, train: list[DistillPair],
                        held_out: list[DistillPair], *, rank: int = 8,
                        targets: tuple[str, ...] = (), steps: int = 300, batch_size: int = 4,
                        learning_rate: float = 1e-3, seed: int = 0,
                        progress: Progress | None = None) -> DistillResult:
    """A domain LoRA (on `targets` of layers [L, N); none named: every projection) trained by KL divergence
    from the full model's next-token distribution to the PLOT-fed upper layers'."""
    teacher = CausalTrainer(model, CausalTrainSettings(split_layer=0, rank=rank))
    student = CausalTrainer(model, CausalTrainSettings(
        split_layer=split_layer, rank=rank, alpha=2.0 * rank, targets=targets or every_projection(model),
        batch_size=batch_size, learning_rate=learning_rate, seed=seed, epochs=1000, max_steps=steps))

    def kl(batch: list[DistillPair], with_adapter: bool = True) -> torch.Tensor:
        with torch.no_grad():
            reference, _ = teacher.next_token_logits([p.teacher for p in batch], with_adapter=False)
            reference = F.log_softmax(reference, dim=-1)
        logits, _ = student.next_token_logits([p.student for p in batch], with_adapter)
        return F.kl_div(F.log_softmax(logits, dim=-1), reference, log_target=True, reduction="batchmean")

    def held_out_kl(with_adapter: bool) -> float:
        with torch.no_grad():
            values = [float(kl(held_out[i:i + 8], with_adapter)) for i in range(0, len(held_out), 8)]
        return sum(values) / max(1, len(values))

    before = held_out_kl(False)
    fit_batches(student.parameters(), train, kl, epochs=1000, batch_size=batch_size, learning_rate=learning_rate,
                seed=seed, max_steps=steps, progress=progress)
    return DistillResult(student.adapter(), before, held_out_kl(True), steps)


def corrected_model(model: DecoderModel, adapter: Adapter) -> DecoderModel:
    """`model` with the domain LoRA merged into a copy of its weights: what a tenant of the domain computes on."""
    return model.with_weights(merged_model(model.model, adapter))
