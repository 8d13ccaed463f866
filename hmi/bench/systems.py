"""The three systems the benchmark compares, each serving the same tenants (same adapters and heads).

- naive: what a team without HMI runs: one `transformers` model per tenant with its LoRA merged, an LRU
  of as many as fit a memory budget, one request at a time.
- peft: one base model with every tenant's LoRA loaded by PEFT, mixed-tenant batches (`adapter_names`),
  every layer computed.
- hmi: the three gRPC services (PLOT + upper layers + segmented LoRA), driven through the gateway.

Each answers `classify(tenant, texts) -> labels` from many threads at once.
"""
from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.adapter_format import Adapter, random_adapter, serialize_adapter
from models.dims import ModelDims
from models.families import family
from models.loading import load_bert, load_tokenizer
from models.lora_merge import merged_model
from models.lower import pad_batch as pad
from models.split_defaults import tenant_targets
from training.tenant_training import encode as encode_texts

RANK = 8
LABELS = ["a", "b"]


@dataclass
class BenchSettings:
    model_dir: Path
    split_layer: int = 2
    memory_budget_bytes: int = 2 << 30     # naive: models kept in memory
    max_batch: int = 32                    # peft: sequences per forward
    max_wait: float = 0.005                # peft: seconds a batch waits to fill
    max_tokens: int = 128
    corpus: Path | None = None             # hmi: the PLOT corpus
    logs_dir: Path | None = None           # hmi: the services' logs are copied here when a run ends
    decoder_weights: str = "float32"       # hmi: compute's copy of a decoder's shared weights (--decoder-weights)


def tenant_adapter(dims: ModelDims, tenant: int, split_layer: int) -> Adapter:
    """Tenant i's adapter, the same in every system: LoRA on the layers HMI computes, on the projections
    `hmi tenant train` adapts there by default, and a head."""
    return random_adapter(dims, num_labels=len(LABELS), rank=RANK, first_layer=split_layer,
                          targets=tenant_targets(dims, split_layer), seed=tenant + 1)


def peft_modules(targets: tuple[str, ...]) -> dict[str, str]:
    """HMI target -> module path within a BERT layer (PEFT's `target_modules` match these as suffixes)."""
    return {target: family("bert").module_of(target) for target in targets}


@contextmanager
def _per_adapter_rescans_skipped(layer: torch.nn.Module):
    """Within, the LoRA layer's `update_layer` skips its two steps that scan every adapter the layer holds:
    re-activating them all (`set_adapter`: requires_grad on each) and moving the new one to the base layer's
    device (which first checks all adapters' parameters for meta tensors). `add_lora_adapters` does both once."""
    layer.set_adapter = lambda *args, **kwargs: None
    layer._move_adapter_to_device_of_base_layer = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del layer.set_adapter, layer._move_adapter_to_device_of_base_layer


def add_lora_adapters(model, config, names: list[str]) -> None:
    """Adds the LoRA adapters `names`, each with `config`, to a PEFT model that `get_peft_model` made with
    `config`: the model `model.add_adapter(name, config)` per name builds, in one pass.

    `add_adapter` re-walks the whole model each call (matching targets, snapshotting and re-marking every
    parameter's requires_grad, re-activating every layer) and each LoRA layer's `update_layer` re-scans all
    the adapters it holds, so the n-th adapter costs O(n): 1,000 tenants on 18 projections took ~2,250 s of setup
    (docs/performance.md). Here each LoRA layer's own `update_layer` creates every adapter (the call
    `add_adapter` makes for a module that already is a LoRA layer, same arguments), and the two per-call
    re-scans run once per layer at the end. The LoRA layers and their forward (`adapter_names=`) stay PEFT's.
    Plain LoRA only (what PeftSystem uses): rank or alpha patterns, DoRA and modules_to_save are refused.
    """
    from peft.tuners.lora import LoraLayer
    if config.rank_pattern or config.alpha_pattern or config.use_dora or config.modules_to_save:
        raise ValueError("add_lora_adapters builds plain LoRA adapters only; use add_adapter for this config")
    if clash := sorted(set(names) & set(model.peft_config)):
        raise ValueError(f"adapters {clash} already exist")
    layers = [(key, module) for key, module in model.base_model.model.named_modules()
              if isinstance(module, LoraLayer)]
    for name in names:
        model.peft_config[name] = config
    for key, layer in layers:
        with _per_adapter_rescans_skipped(layer):
            for name in names:
                layer.update_layer(name, config.r, lora_alpha=config.lora_alpha, target_name=key, config=config)
        weight = layer.get_base_layer().weight
        for adapters in (getattr(layer, attribute) for attribute in layer.adapter_layer_names):
            if isinstance(adapters, torch.nn.ModuleDict):
                for name in names:
                    if name in adapters:
                        adapters[name].to(weight.device, dtype=weight.dtype)
        layer.set_adapter(layer.active_adapters, inference_mode=config.inference_mode)


def encode(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    return [ids.tolist() for ids in encode_texts(tokenizer, texts, max_tokens)]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


class BatchWorker:
    """One thread running batches of queued items: an item waits at most `max_wait` for company, a batch
    holds at most `max_batch`. Items are tuples whose last element is the caller's Future; when `run`
    raises, every caller in the batch gets the error."""

    def __init__(self, run: Callable[[list[tuple]], None], *, max_batch: int, max_wait: float, name: str) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def submit(self, item: tuple) -> None:
        self.queue.put(item)

    @torch.inference_mode()
    def _serve(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                try:
                    more = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)
                    break
                batch.append(more)
            try:
                self.run(batch)
            except Exception as error:  # noqa: BLE001 - handed to every waiting caller
                for *_, future in batch:
                    future.set_exception(error)

    def close(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout=timeout)


class NaiveSystem:
    name = "naive"

    def __init__(self, settings: BenchSettings, tenants: int) -> None:
        self.settings = settings
        self.dims = ModelDims.from_dir(settings.model_dir)
        self.base = load_bert(settings.model_dir)
        self.tokenizer = load_tokenizer(settings.model_dir)
        model_bytes = sum(p.numel() * p.element_size() for p in self.base.parameters())
        self.capacity = max(1, settings.memory_budget_bytes // model_bytes)
        self.models: OrderedDict[int, tuple] = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0

    def classify(self, tenant: int, texts: list[str]) -> list[int]:
        return self.logits(tenant, texts).argmax(-1).tolist()

    @torch.inference_mode()
    def logits(self, tenant: int, texts: list[str]) -> torch.Tensor:
        with self.lock:   # one model, one request at a time: the naive deployment
            model, adapter = self._model(tenant)
            ids, mask = pad(encode(self.tokenizer, texts, self.settings.max_tokens))
            hidden = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
            return mean_pool(hidden, mask) @ adapter.head_weight.T + adapter.head_bias

    def _model(self, tenant: int):
        if tenant in self.models:
            self.models.move_to_end(tenant)
            return self.models[tenant]
        if len(self.models) >= self.capacity:
            self.models.popitem(last=False)
        adapter = tenant_adapter(self.dims, tenant, self.settings.split_layer)
        self.models[tenant] = (merged_model(self.base, adapter), adapter)
        self.loads += 1
        return self.models[tenant]

    def details(self) -> dict:
        return {"models_in_memory": self.capacity, "model_loads": self.loads}

    def close(self) -> None:
        self.models.clear()


class PeftSystem:
    name = "peft"

    def __init__(self, settings: BenchSettings, tenants: int) -> None:
        from peft import LoraConfig, get_peft_model
        self.settings = settings
        self.dims = ModelDims.from_dir(settings.model_dir)
        self.tokenizer = load_tokenizer(settings.model_dir)
        layers = list(range(settings.split_layer, self.dims.layers))
        self.modules = peft_modules(tenant_targets(self.dims, settings.split_layer))
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(self.modules.values()),
                            layers_to_transform=layers, lora_dropout=0.0)
        self.model = get_peft_model(load_bert(settings.model_dir), config, adapter_name="t0")
        add_lora_adapters(self.model, config, [f"t{tenant}" for tenant in range(1, tenants)])
        heads_w, heads_b = [], []
        for tenant in range(tenants):
            adapter = tenant_adapter(self.dims, tenant, settings.split_layer)
            self._load(f"t{tenant}", adapter)
            heads_w.append(adapter.head_weight)
            heads_b.append(adapter.head_bias)
        self.model.eval()
        self.head_weight, self.head_bias = torch.stack(heads_w), torch.stack(heads_b)
        self.worker = BatchWorker(self._run, max_batch=settings.max_batch, max_wait=settings.max_wait,
                                  name="peft-batcher")

    def _load(self, name: str, adapter: Adapter) -> None:
        encoder = self.model.base_model.model.encoder
        with torch.no_grad():
            for (layer, target), (a, b) in adapter.lora.items():
                module = encoder.layer[layer].get_submodule(self.modules[target])
                module.lora_A[name].weight.copy_(a)
                module.lora_B[name].weight.copy_(b)

    def classify(self, tenant: int, texts: list[str]) -> list[int]:
        return self.logits(tenant, texts).argmax(-1).tolist()

    def logits(self, tenant: int, texts: list[str]) -> torch.Tensor:
        futures = []
        for ids in encode(self.tokenizer, texts, self.settings.max_tokens):
            future: Future = Future()
            self.worker.submit((tenant, ids, future))
            futures.append(future)
        return torch.stack([f.result() for f in futures])

    def _run(self, batch: list[tuple]) -> None:
        ids, mask = pad([ids for _, ids, _ in batch])
        tenants = [tenant for tenant, _, _ in batch]
        hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids),
                            adapter_names=[f"t{t}" for t in tenants]).last_hidden_state
        pooled = mean_pool(hidden, mask)
        index = torch.tensor(tenants)
        logits = torch.einsum("bh,blh->bl", pooled, self.head_weight[index]) + self.head_bias[index]
        for (_, _, future), row in zip(batch, logits):
            future.set_result(row)

    def details(self) -> dict:
        return {"adapters_loaded": self.head_weight.shape[0]}

    def close(self) -> None:
        self.worker.close(timeout=10)


class HmiDeployment:
    """The three services started for a run, one domain `bench`, tenants t0..tN-1 registered through the gateway."""

    def __init__(self, settings: BenchSettings, tenants: int, *, labels: list[str], adapter_of: Callable,
                 context: int, corpus: list[str], start_timeout: float, call_timeout: float) -> None:
        from tqdm import tqdm

        from hmi.launcher import ServiceSet
        self.dims = ModelDims.from_dir(settings.model_dir)
        self.folder = tempfile.TemporaryDirectory(prefix="hmi-bench-")
        self.logs_dir = settings.logs_dir
        data = Path(self.folder.name)
        # The gateway cuts texts where naive and PEFT do (`max_tokens`), so every system runs the same tokens.
        self.services = ServiceSet.on_free_ports(data, model=str(settings.model_dir), log_dir=data / "logs",
                                                 extra_env={"HMI_MAX_SEQUENCE_TOKENS": str(settings.max_tokens),
                                                            "HMI_DECODER_WEIGHTS": settings.decoder_weights})
        self.client = None
        try:
            self.services.start(timeout=start_timeout)
            self.client = self.services.client(timeout=call_timeout)     # the admin token the launcher made
            self.client.build_domain("bench", "\n".join(corpus), split_layer=settings.split_layer, context=context,
                                     min_count=2, learn_threshold=-1)
            for tenant in tqdm(range(tenants), desc="registering HMI tenants", mininterval=5):
                adapter = serialize_adapter(adapter_of(self.dims, tenant, settings.split_layer))
                self.client.register_tenant(f"t{tenant}", "bench", labels, adapter)
        except BaseException:
            self.close()     # stops what started and keeps the logs that say why
            raise

    def service_pids(self) -> dict[str, int]:
        return {s.name: s.process.pid for s in self.services.services if s.process is not None}

    def compute_stats(self):
        from services.common.rpc import channel as service_channel
        from services.compute.client import stats
        with service_channel(self.services.compute_addrs[0], security=self.services.peer_security()) as channel:
            return stats(channel)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.services.stop()
        if self.logs_dir is not None:   # what each service logged (batch sizes, stage times, hit rates)
            shutil.copytree(Path(self.folder.name) / "logs", self.logs_dir, dirs_exist_ok=True)
        self.folder.cleanup()


class HmiSystem(HmiDeployment):
    name = "hmi"

    def __init__(self, settings: BenchSettings, tenants: int) -> None:
        from hmi.bench.workload import DEMO_CORPUS, load_texts
        super().__init__(settings, tenants, labels=LABELS, adapter_of=tenant_adapter, context=0,
                         corpus=load_texts(settings.corpus or DEMO_CORPUS), start_timeout=300, call_timeout=120)

    def classify(self, tenant: int, texts: list[str]) -> list[int]:
        return [LABELS.index(p.label) for p in self.client.classify(f"t{tenant}", texts, truncate=True)]

    def details(self) -> dict:
        stats = self.compute_stats()
        lookups = list(stats.plot_hit_depths)
        return {"adapter_hits_device": stats.adapter_hits_device, "adapter_hits_host": stats.adapter_hits_host,
                "adapter_misses": stats.adapter_misses, "device_slots": stats.device_slots,
                "batches": stats.batches, "sequences": stats.sequences,
                "io_hidden_share": stats.io_hidden_seconds / stats.io_seconds if stats.io_seconds else 0.0,
                "plot_hit_depths": lookups,
                "plot_mean_hit_depth": float(np.average(np.arange(1, len(lookups) + 1), weights=lookups))
                if sum(lookups) else 0.0}


SYSTEMS = {"naive": NaiveSystem, "peft": PeftSystem, "hmi": HmiSystem}
