"""The generation workload's systems: same generative tenants (tenant i's rank-8 LoRA on query and value,
seed i), same prompts, greedy decoding, `max_new_tokens` each (fewer when end-of-text comes first).

- peft: one Llama-family base model with every tenant's LoRA loaded by PEFT; requests waiting together
  form a batch (left-padded) that `generate` runs to its end with `adapter_names` (static batching: a
  batch's requests start and finish together, newcomers wait for the next one).
- hmi: the three services; requests stream through the gateway's `Generate` and are continuously batched
  at token granularity in compute.

Each answers `generate(tenant, text, max_new_tokens) -> Generation` from many threads at once, with the
time of every token, so time to first token and inter-token latency are measured the same way.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from hmi.bench.systems import BatchWorker, BenchSettings, HmiDeployment
from models.adapter_format import Adapter, random_adapter
from models.dims import ModelDims
from models.loading import eos_token_ids, load_causal_lm, load_tokenizer

TARGETS = ("query", "value")
RANK = 8


@dataclass
class Generation:
    tokens: list[int]
    started: float                                        # perf_counter at submission
    token_times: list[float] = field(default_factory=list)   # perf_counter when each token was known


def generative_adapter(dims: ModelDims, tenant: int, split_layer: int) -> Adapter:
    return random_adapter(dims, num_labels=0, rank=RANK, first_layer=split_layer, targets=TARGETS, seed=tenant + 1)


class StepClock:
    """A logits processor that only notes when each decoding step's scores are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


class PeftGenerateSystem:
    name = "peft"

    def __init__(self, settings: BenchSettings, tenants: int) -> None:
        from peft import LoraConfig, get_peft_model
        self.settings = settings
        self.dims = ModelDims.from_dir(settings.model_dir)
        if self.dims.family != "llama":
            raise ValueError("the PEFT generation system needs a Llama-family model (q_proj / v_proj)")
        self.tokenizer = load_tokenizer(settings.model_dir)
        self.eos = eos_token_ids(settings.model_dir)
        layers = list(range(settings.split_layer, self.dims.layers))
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"],
                            layers_to_transform=layers, lora_dropout=0.0)
        self.model = get_peft_model(load_causal_lm(settings.model_dir), config, adapter_name="t0")
        for tenant in range(tenants):
            name = f"t{tenant}"
            if tenant:
                self.model.add_adapter(name, config)
            self._load(name, generative_adapter(self.dims, tenant, settings.split_layer))
        self.model.eval()
        self.worker = BatchWorker(self._run, max_batch=settings.max_batch, max_wait=settings.max_wait,
                                  name="peft-generate")

    def _load(self, name: str, adapter: Adapter) -> None:
        modules = {"query": "q_proj", "value": "v_proj"}
        layers = self.model.base_model.model.model.layers
        with torch.no_grad():
            for (layer, target), (a, b) in adapter.lora.items():
                module = getattr(layers[layer].self_attn, modules[target])
                module.lora_A[name].weight.copy_(a)
                module.lora_B[name].weight.copy_(b)

    def generate(self, tenant: int, text: str, max_new_tokens: int) -> Generation:
        future: Future = Future()
        self.worker.submit((tenant, self.tokenizer.encode(text).ids, max_new_tokens, time.perf_counter(), future))
        return future.result()

    def _run(self, batch) -> None:
        width = max(len(ids) for _, ids, *_ in batch)
        pad = self.eos[0] if self.eos else 0
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids, *_ in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids, *_ in batch])
        clock = StepClock()
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=max(m for _, _, m, *_ in batch), pad_token_id=pad,
                                  adapter_names=[f"t{tenant}" for tenant, *_ in batch], logits_processor=[clock])
        for row, (_tenant, _ids, wanted, started, future) in enumerate(batch):
            tokens = []
            for token in out[row, width:].tolist()[:wanted]:
                tokens.append(token)
                if token in self.eos:
                    break
            future.set_result(Generation(tokens, started, clock.times[:len(tokens)]))

    def details(self) -> dict:
        return {"adapters_loaded": len(self.model.peft_config)}

    def close(self) -> None:
        self.worker.close(timeout=30)


class HmiGenerateSystem(HmiDeployment):
    name = "hmi"

    def __init__(self, settings: BenchSettings, tenants: int) -> None:
        from hmi.bench.workload import DEMO_CORPUS, load_texts
        corpus = load_texts(settings.corpus or DEMO_CORPUS) if settings.split_layer > 0 else []
        super().__init__(settings, tenants, labels=[], adapter_of=generative_adapter, context=1, corpus=corpus,
                         start_timeout=600, call_timeout=600)

    def generate(self, tenant: int, text: str, max_new_tokens: int) -> Generation:
        result = Generation([], time.perf_counter())
        for message in self.client.generate(f"t{tenant}", text, max_new_tokens=max_new_tokens):
            if message.token_ids:
                now = time.perf_counter()
                result.tokens.extend(message.token_ids)
                result.token_times.extend([now] * len(message.token_ids))
        return result

    def details(self) -> dict:
        stats = self.compute_stats()
        return {"generation_steps": stats.generation_steps, "generated_tokens": stats.generated_tokens,
                "tokens_per_step": stats.generated_tokens / max(1, stats.generation_steps),
                "adapter_hits_device": stats.adapter_hits_device, "adapter_misses": stats.adapter_misses}


GENERATE_SYSTEMS = {"peft": PeftGenerateSystem, "hmi": HmiGenerateSystem}
