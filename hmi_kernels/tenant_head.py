"""Per-tenant classification heads over pooled vectors, every head in one pool buffer addressed by slot."""
from __future__ import annotations

import torch


def head_reference(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seq_slot: torch.Tensor,
                   seq_labels: torch.Tensor) -> torch.Tensor:
    """logits[s, j] = pooled[s] . weight[slot(s), j] + bias[slot(s), j] for j < labels(s), else 0.

    pooled: [S, H]; weight: [slots, max_labels, H]; bias: [slots, max_labels]; seq_slot, seq_labels: int [S]."""
    slots = seq_slot.long().clamp(min=0)
    logits = torch.einsum("sh,slh->sl", pooled, weight[slots]) + bias[slots]
    label_index = torch.arange(weight.shape[1], device=pooled.device)[None, :]
    used = (label_index < seq_labels[:, None]) & (seq_slot >= 0)[:, None]
    return torch.where(used, logits, torch.zeros_like(logits))


def head_cuda(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seq_slot: torch.Tensor,
              seq_labels: torch.Tensor) -> torch.Tensor:
    from hmi_kernels.runtime import blocks, check_contiguous, launch
    sequences, hidden_dim = pooled.shape
    max_labels = weight.shape[1]
    logits = torch.empty(sequences, max_labels, dtype=torch.float32, device=pooled.device)
    if sequences == 0:
        return logits
    check_contiguous(pooled=pooled, weight=weight, bias=bias, seq_slot=seq_slot, seq_labels=seq_labels)
    warps = 8
    launch("tenant_head", "tenant_head", (sequences, blocks(max_labels, warps)), (32, warps),
           pooled, weight, bias, seq_slot, seq_labels, logits, sequences, hidden_dim, max_labels)
    return logits


def tenant_heads(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seq_slot: torch.Tensor,
                 seq_labels: torch.Tensor) -> torch.Tensor:
    from hmi_kernels.dispatch import use_cuda_kernels
    if use_cuda_kernels(pooled):
        return head_cuda(pooled, weight, bias, seq_slot, seq_labels)
    return head_reference(pooled, weight, bias, seq_slot, seq_labels)
