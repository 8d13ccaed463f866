"""Choosing a generated token from its logits: greedy, or sampled with the request's own seeded generator
(so the same seed gives the same text whatever else shares its steps)."""
from __future__ import annotations

import torch

from services.compute.generation_scheduler import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Greedy at temperature 0; else temperature, then top-k, then top-p (nucleus), drawn with the request's
    own generator."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.double() / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, index = torch.sort(scores, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= params.top_p   # keep the smallest set reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, index, drop), float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
