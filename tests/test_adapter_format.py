"""Tenant adapter files: what serialize_adapter writes, parse_adapter reads back exactly, and every
malformed upload is refused with InvalidArgument and a message that says what to fix."""
from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import save

from models.adapter_format import (
    FORMAT,
    Adapter,
    parse_adapter,
    random_adapter,
    serialize_adapter,
    target_shape,
)
from models.dims import ModelDims
from services.common.errors import InvalidArgument

DIMS = ModelDims(family="bert", hidden=32, intermediate=64, layers=4, heads=4, vocab=100, max_positions=64)
LABELS = 3
RANK = 4
FIRST = 2
TARGETS = ("query", "value", "ffn_in", "ffn_out")


def make(seed: int = 7, **kwargs) -> Adapter:
    args = dict(num_labels=LABELS, rank=RANK, first_layer=FIRST, targets=TARGETS, seed=seed)
    args.update(kwargs)
    return random_adapter(DIMS, **args)


def tensors_of(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter as the flat name -> tensor dict of the file format."""
    tensors = {f"layers.{layer}.{target}.lora_{which}": tensor.clone()
               for (layer, target), pair in adapter.lora.items() for which, tensor in zip("AB", pair)}
    tensors["head.weight"] = adapter.head_weight.clone()
    tensors["head.bias"] = adapter.head_bias.clone()
    return tensors


def file_of(tensors: dict[str, torch.Tensor], rank: int = RANK, alpha: float = 8.0) -> bytes:
    return save(tensors, metadata={"format": FORMAT, "rank": str(rank), "alpha": str(alpha)})


def parse(data: bytes, **kwargs) -> Adapter:
    kwargs.setdefault("num_labels", LABELS)
    return parse_adapter(data, DIMS, **kwargs)


# ---- roundtrip -------------------------------------------------------------------------------

def test_serialize_parse_roundtrip():
    """Every tensor, the rank, alpha, layers and targets survive the file format unchanged."""
    adapter = make(alpha=5.0)
    parsed = parse(serialize_adapter(adapter), min_layer=FIRST)
    assert parsed.rank == RANK
    assert parsed.alpha == 5.0
    assert parsed.scaling == pytest.approx(5.0 / RANK)
    assert parsed.layers == list(range(FIRST, DIMS.layers)) == adapter.layers
    assert parsed.targets == TARGETS == adapter.targets
    assert parsed.num_labels == LABELS
    assert set(parsed.lora) == set(adapter.lora)
    for key, (a, b) in adapter.lora.items():
        fan_in, fan_out = target_shape(key[1], DIMS)
        assert parsed.lora[key][0].shape == (RANK, fan_in)
        assert parsed.lora[key][1].shape == (fan_out, RANK)
        assert torch.equal(parsed.lora[key][0], a)
        assert torch.equal(parsed.lora[key][1], b)
    assert torch.equal(parsed.head_weight, adapter.head_weight)
    assert torch.equal(parsed.head_bias, adapter.head_bias)
    assert parsed.nbytes() == adapter.nbytes()


def test_random_adapter_default_alpha_and_nonzero_matrices():
    """Default alpha is 2 * rank, and A, B are non-zero so tenants really differ."""
    adapter = make()
    assert adapter.alpha == 2 * RANK
    assert all(a.abs().sum() > 0 and b.abs().sum() > 0 for a, b in adapter.lora.values())


def test_random_adapter_same_seed_same_tensors():
    first, second = make(seed=123), make(seed=123)
    for key in first.lora:
        assert torch.equal(first.lora[key][0], second.lora[key][0])
        assert torch.equal(first.lora[key][1], second.lora[key][1])
    assert torch.equal(first.head_weight, second.head_weight)
    assert torch.equal(first.head_bias, second.head_bias)


def test_random_adapter_different_seeds_differ():
    first, second = make(seed=1), make(seed=2)
    key = (FIRST, "query")
    assert not torch.equal(first.lora[key][0], second.lora[key][0])
    assert not torch.equal(first.head_weight, second.head_weight)


def test_random_adapter_seed_zero_is_deterministic():
    first, second = make(seed=0), make(seed=0)
    assert torch.equal(first.head_weight, second.head_weight)


def test_parse_accepts_float16_and_bfloat16_as_float32():
    """Half-precision uploads are accepted and kept as fp32 (values as the half tensors hold them)."""
    adapter = make()
    for dtype in (torch.float16, torch.bfloat16):
        halves = {name: tensor.to(dtype) for name, tensor in tensors_of(adapter).items()}
        parsed = parse(file_of(halves))
        key = (FIRST, "value")
        assert parsed.lora[key][0].dtype == torch.float32
        assert parsed.head_weight.dtype == torch.float32
        assert torch.equal(parsed.lora[key][0], halves[f"layers.{FIRST}.value.lora_A"].float())
        assert torch.equal(parsed.head_bias, halves["head.bias"].float())


def test_num_labels_none_accepts_any_head_size():
    """Compute passes num_labels=None: it trusts the head size the store validated."""
    for labels in (1, 2, 9):
        parsed = parse(serialize_adapter(make(num_labels=labels)), num_labels=None)
        assert parsed.num_labels == labels
    # ...but the head must still match the hidden size
    tensors = tensors_of(make())
    tensors["head.weight"] = torch.zeros(LABELS, DIMS.hidden + 1)
    with pytest.raises(InvalidArgument, match="hidden size"):
        parse(file_of(tensors), num_labels=None)


def test_an_encoder_adapter_without_head_is_an_embedding_only_tenant():
    """No labels, no head: the LoRA alone (compute serves the pooled vector); a head without labels is refused."""
    tensors = {k: v for k, v in tensors_of(make()).items() if not k.startswith("head.")}
    for num_labels in (0, None):
        parsed = parse(file_of(tensors), num_labels=num_labels)
        assert parsed.num_labels == 0 and parsed.lora
    with pytest.raises(InvalidArgument, match="no labels"):
        parse(serialize_adapter(make()), num_labels=0)
    with pytest.raises(InvalidArgument, match="head"):
        parse(file_of(tensors), num_labels=LABELS)


def test_min_layer_allows_layers_at_and_above_it():
    parsed = parse(serialize_adapter(make()), min_layer=FIRST)
    assert min(parsed.layers) == FIRST


# ---- rejections ------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"", b"garbage", b"\xff" * 100, b"not a safetensors file at all" * 10,
                                  struct.pack("<Q", 4) + b"{{{{"],
                         ids=["empty", "short", "huge-header-len", "text", "bad-json"])
def test_parse_rejects_garbage_bytes(data):
    with pytest.raises(InvalidArgument, match="not safetensors|not valid safetensors"):
        parse(data)


@pytest.mark.parametrize("header", [b"[]", b"1"], ids=["list", "number"])
def test_parse_rejects_non_object_json_header(header):
    with pytest.raises(InvalidArgument):
        parse(struct.pack("<Q", len(header)) + header)


def test_parse_rejects_truncated_file():
    """Cut anywhere (header length, header, tensor data), a file is refused, never half-read."""
    data = serialize_adapter(make())
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidArgument):
            parse(data[:cut])


def test_parse_rejects_wrong_head_label_count():
    with pytest.raises(InvalidArgument, match="labels"):
        parse(serialize_adapter(make(num_labels=LABELS + 1)), num_labels=LABELS)


def test_parse_rejects_head_bias_of_other_size():
    tensors = tensors_of(make())
    tensors["head.bias"] = torch.zeros(LABELS + 1)
    with pytest.raises(InvalidArgument, match="labels"):
        parse(file_of(tensors))


def test_parse_rejects_missing_head():
    tensors = tensors_of(make())
    del tensors["head.bias"]
    with pytest.raises(InvalidArgument, match="head"):
        parse(file_of(tensors))


def _with(tensors: dict[str, torch.Tensor], **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**tensors, **extra}


def _pair(layer: int, target: str, rank: int = RANK) -> dict[str, torch.Tensor]:
    fan_in, fan_out = target_shape(target, DIMS)
    return {f"layers.{layer}.{target}.lora_A": torch.ones(rank, fan_in),
            f"layers.{layer}.{target}.lora_B": torch.ones(fan_out, rank)}


def test_parse_rejects_unknown_target():
    tensors = _with(tensors_of(make()), **_pair(FIRST, "gate"))
    with pytest.raises(InvalidArgument, match="unknown LoRA target 'gate'"):
        parse(file_of(tensors))


def test_parse_rejects_layer_below_min_layer():
    tensors = _with(tensors_of(make()), **_pair(FIRST - 1, "query"))
    parse(file_of(tensors), min_layer=FIRST - 1)  # fine when compute serves that layer
    with pytest.raises(InvalidArgument, match=f"layer {FIRST - 1} is outside"):
        parse(file_of(tensors), min_layer=FIRST)


def test_parse_rejects_layer_beyond_the_model():
    tensors = _with(tensors_of(make()), **_pair(DIMS.layers, "query"))
    with pytest.raises(InvalidArgument, match=f"layer {DIMS.layers} is outside"):
        parse(file_of(tensors))


def test_parse_rejects_missing_lora_b():
    tensors = tensors_of(make())
    del tensors[f"layers.{FIRST}.value.lora_B"]
    with pytest.raises(InvalidArgument, match=f"layers.{FIRST}.value needs both lora_A and lora_B"):
        parse(file_of(tensors))


@pytest.mark.parametrize("name, shape", [
    (f"layers.{FIRST}.query.lora_A", (RANK, DIMS.hidden + 1)),
    (f"layers.{FIRST}.query.lora_A", (RANK + 1, DIMS.hidden)),
    (f"layers.{FIRST}.ffn_in.lora_A", (RANK, DIMS.intermediate)),  # in/out swapped for ffn_in
    (f"layers.{FIRST}.ffn_out.lora_B", (DIMS.intermediate, RANK)),
    (f"layers.{FIRST}.query.lora_A", (RANK * DIMS.hidden,)),
], ids=["A-fan-in", "A-rank", "ffn_in-swapped", "ffn_out-B", "A-flat"])
def test_parse_rejects_wrong_lora_shape(name, shape):
    tensors = tensors_of(make())
    tensors[name] = torch.zeros(shape)
    with pytest.raises(InvalidArgument, match="do not match rank"):
        parse(file_of(tensors))


def test_parse_rejects_rank_metadata_disagreeing_with_tensors():
    with pytest.raises(InvalidArgument, match="do not match rank"):
        parse(file_of(tensors_of(make()), rank=RANK * 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", [f"layers.{FIRST}.query.lora_A", f"layers.{FIRST + 1}.value.lora_B",
                                  "head.weight", "head.bias"])
def test_parse_rejects_non_finite_values(name, bad):
    tensors = tensors_of(make())
    tensors[name].view(-1)[0] = bad
    with pytest.raises(InvalidArgument, match=f"{name} contains NaN or infinity"):
        parse(file_of(tensors))


@pytest.mark.parametrize("name", [f"layers.{FIRST}.query.lora_A", f"layers.{FIRST + 1}.value.lora_B", "head.bias"])
def test_parse_names_the_tensor_with_a_value_above_the_limit(name):
    tensors = tensors_of(make())
    tensors[name].view(-1)[-1] = -2e4
    with pytest.raises(InvalidArgument, match=f"{name} has values up to 2e.04, above the limit"):
        parse(file_of(tensors))
    tensors[name].view(-1)[-1] = 1e4                     # at the limit: accepted
    parse(file_of(tensors))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.float64])
def test_parse_rejects_non_float_dtypes(dtype):
    tensors = tensors_of(make())
    name = f"layers.{FIRST}.query.lora_A"
    tensors[name] = tensors[name].to(dtype)
    with pytest.raises(InvalidArgument, match="dtype"):
        parse(file_of(tensors))


@pytest.mark.parametrize("name", ["extra", "layers.2.query.lora_C", "layers.x.query.lora_A",
                                  "encoder.layer.2.attention.self.query.weight", "head.scale"])
def test_parse_rejects_unexpected_tensor_name(name):
    tensors = tensors_of(make())
    tensors[name] = torch.zeros(2)
    with pytest.raises(InvalidArgument, match="unexpected tensor"):
        parse(file_of(tensors))


def test_parse_rejects_other_format():
    data = save(tensors_of(make()), metadata={"format": "peft", "rank": str(RANK), "alpha": "8"})
    with pytest.raises(InvalidArgument, match="format"):
        parse(data)


def test_parse_rejects_non_numeric_rank():
    data = save(tensors_of(make()), metadata={"format": FORMAT, "rank": "four", "alpha": "8"})
    with pytest.raises(InvalidArgument, match="rank/alpha must be numbers"):
        parse(data)


def test_parse_without_rank_metadata_infers_rank():
    """rank may be left out: it is read from lora_A."""
    parsed = parse(save(tensors_of(make()), metadata={"format": FORMAT, "alpha": "8"}))
    assert parsed.rank == RANK
    assert parsed.alpha == 8.0


def test_parse_without_metadata_keeps_lora_effective():
    parsed = parse(save(tensors_of(make())))
    assert parsed.rank == RANK
    assert parsed.alpha == RANK  # default alpha = rank, i.e. scaling 1 (non-zero)
