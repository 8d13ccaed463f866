"""Tenant adapter format: LoRA matrices on the upper layers plus a classification head, as safetensors.
Embedding-only tenants (encoders) and generative tenants (decoders) have no head.

Tensor names (fp32, fp16 or bf16 accepted; kept as fp32):
    layers.{i}.{target}.lora_A   [rank, in]
    layers.{i}.{target}.lora_B   [out, rank]
    head.weight                  [num_labels, hidden]
    head.bias                    [num_labels]
Metadata: {"format": "hmi-lora-v1", "rank": "8", "alpha": "16"}. The delta of a projection is
(alpha / rank) * B @ A, as in PEFT. Bytes from the wire are parsed by safetensors only (never pickle).
Everything serving relies on is checked here: finite values within MAX_WEIGHT, alpha finite in
(0, MAX_ALPHA], shapes against the model (the store also checks the rank against compute's limit).
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hmi_errors import InvalidArgument
from models.dims import ModelDims
from models.families import family
from models.lora_names import (  # noqa: F401 - the format's names, re-exported
    DEFAULT_TARGETS,
    FORMAT,
    TARGETS,
    lora_name,
    parse_lora_name,
    read_metadata,
)

MAX_RANK = 256
MAX_ALPHA = 4096.0        # PEFT's alpha is typically 1-2x the rank; far above this, logits overflow
MAX_WEIGHT = 1e4          # |value| of any adapter tensor: trained LoRA factors and heads are orders smaller


def target_shape(target: str, dims: ModelDims) -> tuple[int, int]:
    """(in_features, out_features) of the projection a target names (GPT-2: slices of the fused c_attn;
    Llama: q/k/v/o_proj, up_proj = ffn_in, gate_proj = ffn_gate, down_proj = ffn_out)."""
    attention = dims.heads * dims.head_dim
    if target in ("ffn_in", "ffn_gate"):
        return dims.hidden, dims.intermediate
    if target == "ffn_out":
        return dims.intermediate, dims.hidden
    if target == "query":
        return dims.hidden, attention
    if target in ("key", "value"):
        return dims.hidden, dims.kv_heads * dims.head_dim
    return attention, dims.hidden


@dataclass
class Adapter:
    rank: int
    alpha: float
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, target) -> (A, B)
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    targets: tuple[str, ...] = field(default=())

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.lora})

    @property
    def num_labels(self) -> int:
        return int(self.head_weight.shape[0])

    def nbytes(self) -> int:
        tensors = [t for pair in self.lora.values() for t in pair] + [self.head_weight, self.head_bias]
        return sum(t.numel() * t.element_size() for t in tensors)


def parse_adapter(data: bytes, dims: ModelDims, *, num_labels: int | None, min_layer: int = 0) -> Adapter:
    """Validates every name, shape and dtype against the base model; errors say what to fix.

    num_labels None accepts any head size (compute, which trusts what the store validated). The file is read
    into numpy and copied once into one float32 buffer that every returned tensor views: each torch call gives
    the GIL away and takes it back, and with compute's execution threads running, the ~350 small torch calls a
    per-tensor parse made cost several milliseconds of futex traffic per cold adapter."""
    meta = read_metadata(data)
    try:
        arrays = float_arrays(data)
    except InvalidArgument:
        raise
    except Exception as error:  # safetensors raises its own error types
        raise InvalidArgument(f"adapter file is not valid safetensors: {error}") from error
    if meta.get("format", FORMAT) != FORMAT:
        raise InvalidArgument(f"adapter format {meta.get('format')!r} is not {FORMAT!r}")
    try:
        rank = int(meta.get("rank", "0"))
        alpha = float(meta["alpha"]) if "alpha" in meta else None
    except ValueError as error:
        raise InvalidArgument(f"adapter metadata rank/alpha must be numbers: {error}") from error
    if alpha is not None and not (math.isfinite(alpha) and 0 < alpha <= MAX_ALPHA):
        raise InvalidArgument(f"adapter metadata alpha = {meta['alpha']!r} must be a finite number in "
                              f"(0, {MAX_ALPHA:g}]")

    if "head.weight" not in arrays and "head.bias" not in arrays and not num_labels:
        # No head of their own: generative tenants use the base model's LM head, embedding-only tenants
        # (an encoder tenant registered without labels) serve the pooled vector.
        arrays["head.weight"] = np.zeros((0, dims.hidden), np.float32)
        arrays["head.bias"] = np.zeros(0, np.float32)
        num_labels = 0
    if "head.weight" not in arrays or "head.bias" not in arrays:
        raise InvalidArgument("adapter has no classification head (head.weight and head.bias)")
    head_weight, head_bias = arrays.pop("head.weight"), arrays.pop("head.bias")
    if num_labels is None:
        num_labels = int(head_weight.shape[0]) if head_weight.ndim == 2 else -1
    if num_labels == 0 and head_weight.size:
        raise InvalidArgument(f"adapter has a classification head ({tuple(head_weight.shape)}) but the tenant has no "
                              f"labels: give one label per head row, or leave head.weight/head.bias out "
                              f"(embedding-only and generative tenants have no head)")
    if head_weight.shape != (num_labels, dims.hidden) or head_bias.shape != (num_labels,):
        raise InvalidArgument(
            f"adapter head has shape {tuple(head_weight.shape)} / {tuple(head_bias.shape)} but the tenant has "
            f"{num_labels} labels and the model hidden size is {dims.hidden}: expected "
            f"({num_labels}, {dims.hidden}) / ({num_labels},); the label count must match the head")

    pieces: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    family_targets = family(dims.family).targets
    for name, array in arrays.items():
        parsed = parse_lora_name(name)
        if parsed is None:
            raise InvalidArgument(f"unexpected tensor {name!r} in adapter; names are layers.I.TARGET.lora_A|B "
                                  f"and head.weight/head.bias")
        layer, target, which = parsed
        if target not in TARGETS:
            raise InvalidArgument(f"unknown LoRA target {target!r} in {name}; targets are {', '.join(TARGETS)}")
        if target not in family_targets:
            raise InvalidArgument(f"{name}: {dims.family} models have no {target} projection (targets: "
                                  f"{', '.join(family_targets)})")
        if not min_layer <= layer < dims.layers:
            raise InvalidArgument(f"{name}: layer {layer} is outside the served layers [{min_layer}, {dims.layers})"
                                  f" (layers below the domain's split layer come from PLOT)")
        pieces.setdefault((layer, target), {})[which] = array

    pairs: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for (layer, target), pair in sorted(pieces.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidArgument(f"layers.{layer}.{target} needs both lora_A and lora_B")
        a, b = pair["A"], pair["B"]
        fan_in, fan_out = target_shape(target, dims)
        if rank == 0:
            rank = int(a.shape[0])
        if a.shape != (rank, fan_in) or b.shape != (fan_out, rank):
            raise InvalidArgument(
                f"layers.{layer}.{target}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match "
                f"rank {rank}: expected ({rank}, {fan_in}) / ({fan_out}, {rank})")
        pairs[(layer, target)] = (a, b)
    if pairs and not 1 <= rank <= MAX_RANK:
        raise InvalidArgument(f"adapter rank {rank} is outside 1..{MAX_RANK}")
    named = {"head.weight": head_weight, "head.bias": head_bias,
             **{lora_name(layer, target, which): array
                for (layer, target), pair in pairs.items() for which, array in zip("AB", pair)}}
    tensors = checked_tensors(named)
    lora = {(layer, target): (tensors[lora_name(layer, target, "A")], tensors[lora_name(layer, target, "B")])
            for layer, target in pairs}
    targets = tuple(t for t in TARGETS if any(t == key[1] for key in lora))
    if alpha is None:
        alpha = float(max(rank, 1))  # no metadata: scaling 1, as the matrices are given
    return Adapter(rank=max(rank, 1), alpha=alpha if lora else 1.0, lora=lora, head_weight=tensors["head.weight"],
                   head_bias=tensors["head.bias"], targets=targets)


def float_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The file's tensors as float32 or float16 arrays (read-only views of `data`); bfloat16, which numpy lacks,
    is read by torch and widened."""
    try:
        arrays = load_numpy(data)
    except KeyError:      # a dtype numpy has no name for
        return widened_by_torch(data)
    for name, array in arrays.items():
        if array.dtype not in (np.float32, np.float16):
            raise wrong_dtype(name, array.dtype)
    return arrays


def widened_by_torch(data: bytes) -> dict[str, np.ndarray]:
    tensors = load_safetensors(data)
    for name, tensor in tensors.items():
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise wrong_dtype(name, tensor.dtype)
    return {name: tensor.to(torch.float32).numpy() for name, tensor in tensors.items()}


def wrong_dtype(name: str, dtype) -> InvalidArgument:
    return InvalidArgument(f"adapter tensor {name} has dtype {dtype}; use float32/float16/bfloat16")


def checked_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Every value finite and within MAX_WEIGHT, checked in one pass over one float32 copy of all of them,
    which the returned tensors view (writable, contiguous); the slow search runs only to name a bad tensor."""
    flat = np.concatenate([array.reshape(-1) for array in arrays.values()]).astype(np.float32, copy=False)
    if flat.size and not max(flat.max(), -flat.min()) <= MAX_WEIGHT:     # False for NaN as well
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise InvalidArgument(f"adapter tensor {name} contains NaN or infinity")
            if array.size and np.abs(array).max() > MAX_WEIGHT:
                raise InvalidArgument(f"adapter tensor {name} has values up to {np.abs(array).max():.3g}, above "
                                      f"the limit of {MAX_WEIGHT:g}")
    tensors, offset = {}, 0
    for name, array in arrays.items():
        tensors[name] = torch.from_numpy(flat[offset:offset + array.size].reshape(array.shape))
        offset += array.size
    return tensors


def serialize_adapter(adapter: Adapter) -> bytes:
    tensors = {lora_name(layer, target, which): tensor.contiguous()
               for (layer, target), pair in adapter.lora.items() for which, tensor in zip("AB", pair)}
    if adapter.num_labels:      # generative tenants have none: they use the base model's LM head
        tensors["head.weight"] = adapter.head_weight.contiguous()
        tensors["head.bias"] = adapter.head_bias.contiguous()
    meta = {"format": FORMAT, "rank": str(adapter.rank), "alpha": str(adapter.alpha)}
    return save_safetensors(tensors, metadata=meta)


def random_adapter(dims: ModelDims, *, num_labels: int, rank: int, first_layer: int,
                   targets: tuple[str, ...] = DEFAULT_TARGETS, alpha: float | None = None,
                   seed: int | None = None) -> Adapter:
    """A fresh adapter with non-zero A and B, so every tenant really computes something different."""
    if not 1 <= rank <= MAX_RANK:
        raise InvalidArgument(f"rank {rank} is outside 1..{MAX_RANK}")
    generator = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
    alpha = float(alpha if alpha is not None else 2 * rank)
    lora = {}
    for layer in range(first_layer, dims.layers):
        for target in targets:
            fan_in, fan_out = target_shape(target, dims)
            a = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            b = torch.randn(fan_out, rank, generator=generator) * 0.02
            lora[(layer, target)] = (a, b)
    head_weight = torch.randn(num_labels, dims.hidden, generator=generator) / dims.hidden ** 0.5
    head_bias = torch.randn(num_labels, generator=generator) * 0.01
    return Adapter(rank=rank, alpha=alpha, lora=lora, head_weight=head_weight, head_bias=head_bias,
                   targets=tuple(t for t in TARGETS if t in targets))
