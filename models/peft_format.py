"""PEFT LoRA folders in and out of HMI's adapter format (adapter_format.py), with numpy and safetensors only.

A PEFT folder holds adapter_config.json and adapter_model.safetensors, whose tensors are named after the
transformers modules they adapt (`base_model.model.encoder.layer.3.attention.self.query.lora_A.weight`).
Import maps each module to HMI's target names (GPT-2's fused c_attn becomes query, key and value, which
share its A), folds per-module ranks and scalings (rank_pattern, alpha_pattern, rsLoRA) into one rank and
alpha, and takes a `classifier` / `score` head saved with modules_to_save. Everything else is refused with a
message that says why: DoRA, LoRA biases, embeddings, modules HMI does not adapt, a SEQ_CLS head (it reads
BertForSequenceClassification's pooled [CLS] vector, HMI's heads read the mean of the last hidden states).
The store then checks every shape against the base model, the layers against the domain's split layer and
the rank against the deployment's limit.

Export writes the tenant's LoRA for the base model as transformers loads it (AutoModel for encoders,
AutoModelForCausalLM for decoders), so `PeftModel.from_pretrained(base, DIR)` serves the same model. A
classification head has no module to live in there: it goes beside, as hmi_head.safetensors (logits = weight
· mean of the last hidden states + bias), with the labels in hmi_tenant.json; import reads both back.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from hmi_errors import InvalidArgument
from models.families import QKV, all_families
from models.families import family as family_of
from models.lora_names import FORMAT, lora_name, parse_lora_name, read_metadata

HEAD_FILE = "hmi_head.safetensors"
TENANT_FILE = "hmi_tenant.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Which module is which target, where a layer's modules start in a PEFT module path, where the layers sit in
# the model transformers loads for serving (export writes these paths) and which projection is fused ("qkv":
# its output rows are query, key and value in that order): each model family's (models/families).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_HEAD_KEY = re.compile(r"^(?:.*\.)?(?:classifier|score)(?:\.modules_to_save\.[\w-]+)?\.(?P<part>weight|bias)$")


@dataclass
class Converted:
    """An adapter in HMI's format, ready for RegisterTenant, and what the import found."""
    adapter: bytes
    family: str
    rank: int
    layers: list[int]
    targets: list[str]
    head_labels: int                   # rows of the imported head; 0 = none
    labels: list[str] = field(default_factory=list)   # from hmi_tenant.json (an exported HMI tenant)
    notes: list[str] = field(default_factory=list)


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidArgument(f"{folder} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path} must hold a JSON object")
    return config


def _check_config(config: dict) -> None:
    """Refuses what HMI's LoRA (delta = alpha / rank · B·A on a projection's output) cannot serve."""
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"PEFT type {config.get('peft_type')!r} is not LoRA: HMI serves LoRA adapters only")
    if config.get("use_dora"):
        raise InvalidArgument("DoRA adapters (use_dora) rescale the weights' columns, which HMI does not serve; "
                              "train a plain LoRA")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise InvalidArgument(f"the adapter trains bias terms (bias={config.get('bias')!r}, lora_bias="
                              f"{config.get('lora_bias')}), which HMI does not serve; train with bias='none'")
    for option in ("target_parameters", "layer_replication", "trainable_token_indices"):
        if config.get(option):
            raise InvalidArgument(f"adapter_config.json sets {option}, which HMI does not serve")


def _family_and_target(module: str, expected: str | None) -> tuple[str, int, str]:
    """(family, layer, HMI target) of a PEFT module path, whatever the wrapper's prefix."""
    for name, found_family in all_families().items():
        found = re.search(rf"(?:^|\.){re.escape(found_family.peft_marker)}(\d+)\.(.+)$", module)
        if found and found[2] in found_family.modules and (expected is None or expected == name):
            return name, int(found[1]), found_family.modules[found[2]]
    names = "; ".join(f"{name}: {', '.join(f.modules)}" for name, f in all_families().items()
                      if expected in (None, name))
    raise InvalidArgument(f"LoRA on module {module!r} cannot be served: HMI adapts these projections of each "
                          f"layer ({names})")


def _alpha_of(module: str, config: dict) -> float:
    """The module's lora_alpha (alpha_pattern as PEFT matches it: the pattern ends the module path)."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", config.get("r", 8)))


def import_peft(folder: Path, *, family: str | None = None, keep_head: bool = True) -> Converted:
    """Converts a PEFT LoRA folder to HMI's adapter format; `family` (bert, gpt2, llama), when known, must match.

    keep_head False leaves a classification head out (the LoRA alone: an embedding-only tenant)."""
    folder = Path(folder)
    config = _read_config(folder)
    _check_config(config)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        legacy = " (adapter_model.bin is a pickle: re-save with safe_serialization)" if (
            folder / "adapter_model.bin").exists() else ""
        raise InvalidArgument(f"{folder} has no {WEIGHTS_FILE}{legacy}")
    try:
        tensors = load_safetensors(weights.read_bytes())
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
        raise InvalidArgument(f"{weights} is not valid safetensors: {error}") from error

    pairs: dict[str, dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    others = []
    for name, tensor in tensors.items():
        if (lora := _LORA_KEY.match(name)) is not None:
            pairs.setdefault(lora["module"], {})[lora["which"]] = tensor
        elif (found := _HEAD_KEY.match(name)) is not None:
            head[found["part"]] = tensor
        else:
            others.append(name)
    if not pairs:
        raise InvalidArgument(f"{weights} holds no LoRA matrices")

    modules: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, float]] = {}   # (layer, target) -> A, B, scale
    families = set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidArgument(f"{module} needs both lora_A and lora_B")
        module_family, layer, target = _family_and_target(module, family)
        families.add(module_family)
        a, b = (np.asarray(pair[k], dtype=np.float32) for k in "AB")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InvalidArgument(f"{module}: lora_A {a.shape} and lora_B {b.shape} are not [r, in] and [out, r]")
        rank = a.shape[0]
        scale = _alpha_of(module, config) / (math.sqrt(rank) if config.get("use_rslora") else rank)
        if target == "qkv":
            if b.shape[0] != 3 * a.shape[1]:
                raise InvalidArgument(f"{module}: a fused query-key-value projection has 3 × hidden outputs, "
                                      f"lora_B has {b.shape[0]} for hidden size {a.shape[1]}")
            width = a.shape[1]
            for index, name in enumerate(QKV):
                modules[(layer, name)] = (a, b[index * width:(index + 1) * width], scale)
        else:
            modules[(layer, target)] = (a, b, scale)
    if others:
        raise InvalidArgument(f"tensor {others[0]!r} is neither a LoRA matrix (…lora_A.weight / lora_B.weight) nor a "
                              f"classification head (classifier / score in modules_to_save): HMI cannot serve it")
    if len(families) > 1:
        raise InvalidArgument(f"the adapter mixes module names of several model families ({sorted(families)})")
    found_family = families.pop()

    # One rank and one scaling for the whole adapter: pad lower ranks with zeros, fold other scalings into B.
    rank = max(a.shape[0] for a, _, _ in modules.values())
    reference = next(iter(modules.values()))[2]
    out: dict[str, np.ndarray] = {}
    for (layer, target), (a, b, scale) in sorted(modules.items()):
        padded_a = np.zeros((rank, a.shape[1]), np.float32)
        padded_b = np.zeros((b.shape[0], rank), np.float32)
        padded_a[:a.shape[0]] = a
        padded_b[:, :b.shape[1]] = b if scale == reference else b * np.float32(scale / reference)
        out[lora_name(layer, target, "A")] = padded_a
        out[lora_name(layer, target, "B")] = padded_b

    labels: list[str] = []
    notes: list[str] = []
    exported = _read_exported_head(folder)
    if exported is not None:
        if head:
            raise InvalidArgument(f"{folder} has both a PEFT head and {HEAD_FILE}; keep one")
        head, labels = exported
    if head and keep_head:
        if family_of(found_family).decoder:
            raise InvalidArgument("the adapter saves a classification head, but decoder tenants generate text with "
                                  "the base model's LM head; leave the head out (--no-head)")
        if config.get("task_type") == "SEQ_CLS" and exported is None:
            raise InvalidArgument("the head was trained for BertForSequenceClassification (task_type SEQ_CLS), which "
                                  "classifies the pooler's [CLS] vector; HMI's heads classify the mean of the last "
                                  "hidden states, so it would give other logits. Use --no-head to serve the LoRA as "
                                  "an embedding-only tenant, or train the head on mean-pooled states")
        if set(head) != {"weight", "bias"}:
            raise InvalidArgument("the classification head needs both weight and bias")
        weight, bias = (np.asarray(head[k], dtype=np.float32) for k in ("weight", "bias"))
        if weight.ndim != 2 or bias.shape != (weight.shape[0],):
            raise InvalidArgument(f"the classification head must be one linear layer: weight [labels, hidden] and "
                                  f"bias [labels], got {weight.shape} and {bias.shape}")
        out["head.weight"], out["head.bias"] = weight, bias
    elif head:
        rows = head["weight"].shape[0] if "weight" in head else "?"
        notes.append(f"left out the adapter's classification head ({rows} outputs): the tenant embeds")
    metadata = {"format": FORMAT, "rank": str(rank), "alpha": repr(reference * rank)}
    return Converted(adapter=save_safetensors(out, metadata=metadata), family=found_family, rank=rank,
                     layers=sorted({layer for layer, _ in modules}),
                     targets=sorted({target for _, target in modules}),
                     head_labels=int(out["head.weight"].shape[0]) if "head.weight" in out else 0,
                     labels=labels if "head.weight" in out else [], notes=notes)


def _read_exported_head(folder: Path) -> tuple[dict[str, np.ndarray], list[str]] | None:
    """The head and labels an HMI export wrote beside the PEFT files, if any."""
    if not (folder / HEAD_FILE).is_file():
        return None
    try:
        tensors = load_safetensors((folder / HEAD_FILE).read_bytes())
        info = json.loads((folder / TENANT_FILE).read_text(encoding="utf-8")) if (folder / TENANT_FILE).is_file() \
            else {}
    except Exception as error:  # noqa: BLE001 - safetensors and json raise their own error types
        raise InvalidArgument(f"{folder / HEAD_FILE} or {TENANT_FILE} cannot be read: {error}") from error
    return {k: v for k, v in tensors.items() if k in ("weight", "bias")}, [str(x) for x in info.get("labels", [])]


# ---- export ------------------------------------------------------------------------------------

def _hmi_modules(data: bytes) -> tuple[dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], dict, dict]:
    metadata = read_metadata(data)
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # noqa: BLE001
        raise InvalidArgument(f"the tenant's adapter is not valid safetensors: {error}") from error
    lora: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    head = {}
    for name, tensor in tensors.items():
        if name.startswith("head."):
            head[name[5:]] = tensor.astype(np.float32)
            continue
        parsed = parse_lora_name(name)
        if parsed is None:
            raise InvalidArgument(f"unexpected tensor {name!r} in the tenant's adapter")
        layer, target, which = parsed
        lora.setdefault((layer, target), {})[which] = tensor.astype(np.float32)
    return {key: (pair["A"], pair["B"]) for key, pair in lora.items()}, head, metadata


def export_peft(adapter: bytes, folder: Path, *, family: str, base_model: str, tenant_id: str,
                labels: list[str]) -> list[str]:
    """Writes the tenant as a PEFT folder for the base model (see the module docstring); returns the files."""
    declared = family_of(family)
    lora, head, metadata = _hmi_modules(adapter)
    rank = int(metadata.get("rank", "0")) or max((a.shape[0] for a, _ in lora.values()), default=1)
    alpha = float(metadata.get("alpha", rank))
    prefix = declared.layers_path + "."
    tensors: dict[str, np.ndarray] = {}
    if declared.fused_qkv:
        # query, key and value share one fused projection: its LoRA stacks theirs (A rows, B block-diagonal), at
        # rank k·r for k of them; every module gets that rank (zero-padded) and alpha k·alpha, so the
        # scaling alpha / rank stays the same.
        fused = max((sum((layer, t) in lora for t in QKV) for layer, _ in lora), default=0)
        width = max(fused, 1)
        full_rank = rank * width
        for layer in sorted({layer for layer, _ in lora}):
            present = [t for t in QKV if (layer, t) in lora]
            if present:
                hidden = lora[(layer, present[0])][0].shape[1]
                a = np.zeros((full_rank, hidden), np.float32)
                b = np.zeros((3 * hidden, full_rank), np.float32)
                for slot, target in enumerate(present):
                    part_a, part_b = lora[(layer, target)]
                    row = QKV.index(target) * hidden
                    a[slot * rank:(slot + 1) * rank] = part_a
                    b[row:row + hidden, slot * rank:(slot + 1) * rank] = part_b
                tensors.update(_peft_pair(f"{prefix}{layer}.{declared.fused_qkv}", a, b))
        for (layer, target), (a, b) in lora.items():
            if target not in QKV:
                padded_a = np.zeros((full_rank, a.shape[1]), np.float32)
                padded_b = np.zeros((b.shape[0], full_rank), np.float32)
                padded_a[:rank], padded_b[:, :rank] = a, b
                tensors.update(_peft_pair(f"{prefix}{layer}.{declared.module_of(target)}", padded_a, padded_b))
        rank, alpha = full_rank, alpha * width
    else:
        for (layer, target), (a, b) in lora.items():
            tensors.update(_peft_pair(f"{prefix}{layer}.{declared.module_of(target)}", a, b))
    target_modules = sorted({key[len("base_model.model."):-len(".lora_A.weight")] for key in tensors
                             if key.endswith(".lora_A.weight")})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if declared.decoder else None,
        "base_model_name_or_path": base_model, "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": declared.transposed,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / WEIGHTS_FILE).write_bytes(save_safetensors(tensors, metadata={"format": "pt"}))
    written = [CONFIG_FILE, WEIGHTS_FILE]
    if head.get("weight") is not None and head["weight"].shape[0]:
        (folder / HEAD_FILE).write_bytes(save_safetensors({"weight": head["weight"], "bias": head["bias"]}))
        written.append(HEAD_FILE)
    info = {"tenant_id": tenant_id, "base_model": base_model, "labels": labels,
            "head": HEAD_FILE if HEAD_FILE in written else None,
            "pooling": "mean of the last hidden states over the text's tokens"}
    (folder / TENANT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return written + [TENANT_FILE]


def _peft_pair(module: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {f"base_model.model.{module}.lora_A.weight": np.ascontiguousarray(a),
            f"base_model.model.{module}.lora_B.weight": np.ascontiguousarray(b)}
