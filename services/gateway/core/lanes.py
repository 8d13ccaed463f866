"""What the gateway holds for each base model it serves: an encoder lane (classify, embed: texts are batched
across tenants) or a decoder lane (generate: each sequence streams from one replica)."""
from __future__ import annotations

from dataclasses import dataclass

from services.gateway.batcher import Batcher
from services.gateway.router import Router
from services.gateway.settings import GenerationLimits
from services.gateway.tokenizer import TextEncoder


@dataclass
class EncoderLane:
    name: str
    encoder: TextEncoder
    batcher: Batcher
    router: Router

    @property
    def tokenizer(self):
        return self.encoder.tokenizer


@dataclass
class DecoderLane:
    name: str
    encoder: TextEncoder                # the prompt's tokenizer (and its limits for /tokenize)
    router: Router
    limits: GenerationLimits
    max_positions: int
    eos_token_ids: tuple[int, ...]
    timeout: float = 600.0              # a stream's deadline when the caller gave none

    @property
    def tokenizer(self):
        return self.encoder.tokenizer


Lane = EncoderLane | DecoderLane
