"""Model families, each declared once in a file of its own: where its layers sit, the module behind every LoRA
target (and which projections are fused), its dimensions' names in the config, and what its decoder layers
compute. The encoder and decoder upper stacks, the LoRA merge, the PEFT conversion, the lower stacks and
loading all read them here.

Adding a family (say Qwen2, or a ModernBERT-style encoder) is one new file beside these, registered in
FAMILIES below, plus its exactness test against `transformers` (docs/architecture.md, "Adding a model
family")."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from hmi_errors import InvalidArgument

QKV = ("query", "key", "value")     # the order of a fused query-key-value projection's outputs


@dataclass(frozen=True)
class Family:
    name: str                           # transformers' config.model_type
    decoder: bool
    dims: Callable[[Any], dict]         # config -> ModelDims fields (hidden, intermediate, layers, heads, ...)
    layers_path: str                    # the layer list in the model transformers loads for serving
    peft_marker: str                    # what precedes a layer's index in a PEFT module path
    modules: dict[str, str]             # module path within a layer -> HMI target ("qkv": a fused projection)
    transposed: bool = False            # weights stored [in, out] (GPT-2's Conv1D)
    base: str = ""                      # decoders: the base model inside the causal LM (its embeddings, blocks)
    blocks: str = ""                    # decoders: the block list inside the base model
    final_norm: str = ""                # decoders: the final norm inside the base model
    hooks: dict[str, Callable] = field(default_factory=dict)   # decoders: "embed", "block", "activation", "check"

    @property
    def fused_qkv(self) -> str | None:
        """The module path of a fused query-key-value projection, None when they are separate."""
        return next((path for path, target in self.modules.items() if target == "qkv"), None)

    @property
    def targets(self) -> tuple[str, ...]:
        """HMI's LoRA targets this family serves (a fused projection's three parts each)."""
        found = [t for target in self.modules.values() for t in (QKV if target == "qkv" else (target,))]
        return tuple(dict.fromkeys(found))

    def module_of(self, target: str) -> str:
        """The module path (within a layer) a target adapts; query, key and value of a fused one: its path."""
        if target in QKV and self.fused_qkv:
            return self.fused_qkv
        for path, name in self.modules.items():
            if name == target:
                return path
        raise InvalidArgument(f"LoRA target {target!r} does not exist in {self.name} models (targets: "
                              f"{', '.join(self.targets)})")


def _registry() -> dict[str, Family]:
    from models.families import bert, gpt2, llama
    return {family.name: family for family in (bert.FAMILY, gpt2.FAMILY, llama.FAMILY)}


FAMILIES: dict[str, Family] = {}


def all_families() -> dict[str, Family]:
    if not FAMILIES:
        FAMILIES.update(_registry())
    return FAMILIES


def family(name: str) -> Family:
    families = all_families()
    if name not in families:
        encoders = ", ".join(f.name for f in families.values() if not f.decoder)
        decoders = ", ".join(f.name for f in families.values() if f.decoder)
        raise InvalidArgument(f"model type {name!r} is not supported: HMI serves the {encoders} family (encoders) "
                              f"and the {decoders} families (decoders)")
    return families[name]


def resolve(model: Any, path: str) -> Any:
    """The module at a dotted path inside `model` (list indices allowed)."""
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model
