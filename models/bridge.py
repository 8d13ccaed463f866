"""A domain bridge: a light mixing block that turns a domain's PLOT rows into better layer-L inputs.

A PLOT row is the mean layer-L state of a token's context over the domain corpus: it knows the token, a
few neighbours and (through the position offsets) its position, but not the rest of the sentence, which
the lower layers of the full model had mixed in. The bridge restores part of that: one narrow attention
block over the PLOT rows of each sequence (few heads of small width, a narrow feed-forward), pre-norm
with residuals whose outputs start at zero, so an untrained bridge is the identity. It is trained once
per domain by distillation on the domain's corpus (`services/knowledge_store/bridge_distillation.py`:
bridged PLOT rows towards the lower model's true layer-L states) and shared by every tenant of the
domain; compute applies it to the domain's sequences before the shared upper layers, and tenants are
trained on the bridged rows. It costs a fraction of one layer (`flops_per_token`).

Stored as safetensors (never pickle) with its shape in the metadata.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hmi_errors import InvalidArgument

FORMAT = "hmi-bridge-v1"


@dataclass(frozen=True)
class BridgeShape:
    """The bridge's size: attention heads x head width, feed-forward width, positions it knows."""
    hidden: int
    heads: int = 4
    head_dim: int = 32
    ffn: int = 384
    max_positions: int = 512

    def validate(self) -> None:
        limits = {"hidden": (1, 16384), "heads": (1, 64), "head_dim": (1, 256), "ffn": (1, 65536),
                  "max_positions": (1, 65536)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise InvalidArgument(f"bridge {name} {value!r} is outside {low}..{high}")

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of the dense parts (attention scores left out, as for the layers)."""
        return 2 * (self.hidden * 3 * self.inner + self.inner * self.hidden + 2 * self.hidden * self.ffn)


class DomainBridge(torch.nn.Module):
    def __init__(self, shape: BridgeShape, eps: float = 1e-12) -> None:
        super().__init__()
        shape.validate()
        self.shape = shape
        h = shape.hidden
        self.position = torch.nn.Embedding(shape.max_positions, h)
        self.norm1 = torch.nn.LayerNorm(h, eps=eps)
        self.qkv = torch.nn.Linear(h, 3 * shape.inner)
        self.out = torch.nn.Linear(shape.inner, h)
        self.norm2 = torch.nn.LayerNorm(h, eps=eps)
        self.ffn_in = torch.nn.Linear(h, shape.ffn)
        self.ffn_out = torch.nn.Linear(shape.ffn, h)
        for zero in (self.position.weight, self.out.weight, self.out.bias, self.ffn_out.weight, self.ffn_out.bias):
            torch.nn.init.zeros_(zero)   # an untrained bridge passes the rows through unchanged

    def init_random(self, generator: torch.Generator) -> None:
        """Small random weights everywhere (tests: a bridge that visibly changes the rows)."""
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            self.norm1.weight.add_(1.0)
            self.norm2.weight.add_(1.0)

    def forward(self, rows: torch.Tensor, bounds: list[int], positions: torch.Tensor) -> torch.Tensor:
        """rows: [tokens, H] packed PLOT rows of whole sequences (n+1 `bounds`), positions: int64 [tokens]."""
        if rows.shape[0] == 0:
            return rows
        positions = positions.clamp(max=self.shape.max_positions - 1)
        h = rows + self.position(positions)
        q, k, v = self.qkv(self.norm1(h)).split(self.shape.inner, dim=-1)
        h = h + self.out(self._attention(q, k, v, bounds))
        return h + self.ffn_out(F.gelu(self.ffn_in(self.norm2(h))))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        batch, width = len(lengths), max(lengths)
        valid = torch.arange(width, device=q.device)[None, :] < torch.tensor(lengths, device=q.device)[:, None]
        flat = valid.reshape(-1).nonzero().squeeze(1)
        heads, head_dim = self.shape.heads, self.shape.head_dim

        def padded(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(batch * width, t.shape[-1])
            out[flat] = t
            return out.view(batch, width, heads, head_dim).transpose(1, 2)

        context = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=valid[:, None, None, :])
        return context.transpose(1, 2).reshape(batch * width, -1)[flat]

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def serialize_bridge(bridge: DomainBridge) -> bytes:
    tensors = {name: tensor.detach().to(torch.float32).contiguous().cpu()
               for name, tensor in bridge.state_dict().items()}
    return save_safetensors(tensors, metadata={"format": FORMAT, "shape": json.dumps(asdict(bridge.shape))})


def parse_bridge(data: bytes, hidden: int, device: torch.device | str = "cpu") -> DomainBridge:
    """Bridge bytes (safetensors) -> module, every name and shape checked against a fresh bridge."""
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        shape = BridgeShape(**json.loads(metadata["shape"]))
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, SafetensorError) as error:
        raise InvalidArgument(f"bridge is not a valid {FORMAT} safetensors file: {error}") from error
    if metadata.get("format") != FORMAT:
        raise InvalidArgument(f"bridge format {metadata.get('format')!r} is not {FORMAT!r}")
    if shape.hidden != hidden:
        raise InvalidArgument(f"bridge hidden size {shape.hidden} does not match the model's {hidden}")
    bridge = DomainBridge(shape)
    expected = bridge.state_dict()
    if set(tensors) != set(expected):
        raise InvalidArgument(f"bridge tensors {sorted(set(tensors) ^ set(expected))[:4]} missing or unexpected")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InvalidArgument(f"bridge tensor {name} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[name].shape)}")
        if not torch.isfinite(tensor).all():
            raise InvalidArgument(f"bridge tensor {name} holds non-finite values")
    bridge.load_state_dict({name: tensor.float() for name, tensor in tensors.items()})
    bridge.eval()
    for parameter in bridge.parameters():
        parameter.requires_grad_(False)
    return bridge.to(device)


def layer_flops_per_token(hidden: int, intermediate: int) -> int:
    """Dense FLOPs of one transformer layer per token, to state the bridge's cost in layers."""
    return 2 * (4 * hidden * hidden + 2 * hidden * intermediate)


def bridge_cost_in_layers(shape: BridgeShape, intermediate: int) -> float:
    return shape.flops_per_token() / layer_flops_per_token(shape.hidden, intermediate)



def apply_bridges(hidden: torch.Tensor, layout, bridge_of) -> None:
    """In place: the PLOT rows of every sequence whose domain has a bridge (`bridge_of(j)` for execution
    position j of a models/packing.py PackedLayout), each domain's sequences through its bridge at once."""
    groups: dict[int, tuple[DomainBridge, list[int]]] = {}
    for j in layout.from_plot:
        bridge = bridge_of(j)
        if bridge is not None:
            groups.setdefault(id(bridge), (bridge, []))[1].append(j)
    for bridge, members in groups.values():
        lengths = [layout.lengths[j] for j in members]
        index = torch.cat([torch.arange(layout.bounds[j], layout.bounds[j + 1]) for j in members]).to(hidden.device)
        bounds = [0]
        for length in lengths:
            bounds.append(bounds[-1] + length)
        positions = torch.cat([torch.arange(length) for length in lengths]).to(hidden.device)
        hidden[index] = bridge(hidden[index], bounds, positions)


@torch.no_grad()
def bridge_rows(bridge: DomainBridge, rows: list) -> list:
    """Per sequence: fp16 PLOT rows [T, H] -> bridged fp32 rows, as compute applies them (trainers and studies
    use it to train tenants on the inputs serving gives them)."""
    import numpy as np
    lengths = [len(r) for r in rows]
    if not lengths:
        return []
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    packed = torch.from_numpy(np.concatenate(rows).astype(np.float32))
    positions = torch.cat([torch.arange(n) for n in lengths])
    out = bridge(packed, bounds, positions).numpy()
    return [out[bounds[i]:bounds[i + 1]] for i in range(len(rows))]
