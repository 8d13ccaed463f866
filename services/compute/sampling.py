"""Choosing a generated token from its logits: greedy, or sampled with the request's own seeded generator
(so the same seed gives the same text whatever else shares its steps)."""
from __future__ import annotations

import numpy as np
import torch

from services.compute.generation_scheduler import SamplingParams


def penalise(logits: torch.Tensor, params: SamplingParams, prompt: np.ndarray, generated: list[int]) -> torch.Tensor:
    """The logits with the request's penalties applied (a new tensor; the reported log-probabilities stay the
    model's own, as vLLM's by default). Repetition (CTRL, as transformers' RepetitionPenaltyLogitsProcessor):
    every distinct token of the prompt and of the text so far has a positive logit divided by it and a negative
    one multiplied. Then OpenAI's on the generated tokens only: minus `frequency_penalty` times the token's
    count, minus `presence_penalty` once it appeared."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.from_numpy(np.unique(np.concatenate([np.asarray(prompt, np.int64),
                                                          np.asarray(generated, np.int64)])))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if generated and (params.frequency_penalty or params.presence_penalty):
        tokens, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
        index = torch.from_numpy(tokens)
        logits[index] -= (params.frequency_penalty * torch.from_numpy(counts).to(logits.dtype)
                          + params.presence_penalty)
    return logits


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
