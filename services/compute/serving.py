"""What a compute replica serves: an encoder (packed classification batches through a pipeline) or a decoder
(generation streams from an engine), as two types rather than optional fields checked at every use."""
from __future__ import annotations

from dataclasses import dataclass

from services.compute.adapter_pool import AdapterPool
from services.compute.generation import GenerationEngine
from services.compute.pipeline import Pipeline


@dataclass
class EncoderServing:
    pipeline: Pipeline

    @property
    def pool(self) -> AdapterPool:
        return self.pipeline.pool


@dataclass
class DecoderServing:
    engine: GenerationEngine
    pool: AdapterPool


Serving = EncoderServing | DecoderServing
