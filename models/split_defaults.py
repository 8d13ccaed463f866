"""The split a new domain gets when its builder names none, per model kind, and what the studies measured it
to cost; `hmi domain build`, the store and `hmi bench` all read it from here so they cannot disagree."""
from __future__ import annotations

from dataclasses import dataclass

from models.adapter_format import DEFAULT_TARGETS
from models.dims import ModelDims

ENCODER_CONTEXT = 2     # PLOT keys a token by itself and its left neighbour; the bridge supplies the rest


@dataclass(frozen=True)
class SplitDefault:
    split_layer: int
    context: int
    bridge: bool
    accuracy_cost: str      # what docs/accuracy.md measured at this setting, for people reading a bench table

    def describe(self) -> str:
        if self.split_layer == 0:
            return f"split layer 0 (every layer computed): {self.accuracy_cost}"
        return (f"split layer {self.split_layer}, context {self.context}"
                f"{', domain bridge' if self.bridge else ''}: {self.accuracy_cost}")


def default_split(dims: ModelDims) -> SplitDefault:
    """Encoders: half the layers come from PLOT, repaired by a domain bridge. Decoders: none, since every
    method measured on SmolLM2 cost far more perplexity than the target allows."""
    if dims.is_decoder:
        return SplitDefault(0, 1, False, "exact (the perplexity study found no split a decoder tenant would accept)")
    return SplitDefault(dims.layers // 2, ENCODER_CONTEXT, True, ENCODER_COST)


# Every projection of an encoder layer that a LoRA can adapt.
ENCODER_PROJECTIONS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def tenant_targets(dims: ModelDims, split_layer: int) -> tuple[str, ...]:
    """The projections a tenant's LoRA adapts when its trainer names none.

    Above a split an encoder tenant has only the upper layers to adapt; LoRA on query and value there (what
    it gets on the full model) leaves accuracy behind that adapting every projection of those layers
    recovers (docs/accuracy.md). Decoders and unsplit encoders keep query and value.
    """
    if dims.is_decoder or split_layer == 0:
        return DEFAULT_TARGETS
    return ENCODER_PROJECTIONS


# Mean accuracy loss of MiniLM at L = 3 with context 2 and its bridge, tenants adapting every projection of the
# computed layers, against the full model + LoRA trained on the same examples (docs/accuracy.md).
ENCODER_COST = ("0.80 points below the full model + LoRA on SST-2 (0.8459 against 0.8539, 5 seeds), 0.29 on "
                "medical abstracts (3 seeds); docs/accuracy.md")
