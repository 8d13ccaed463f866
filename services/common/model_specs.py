"""Base models by name: the packaged ones (`minilm`, `smollm2`), `NAME=DIR` or a local folder.

Nothing is ever downloaded: models load from local folders only (models/loading.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument
from services.common.packaged_models import packaged_minilm_dir, packaged_smollm2_dir

KNOWN_MODELS = {"minilm": packaged_minilm_dir, "smollm2": packaged_smollm2_dir}


def resolve_model_dir(name_or_path: str) -> Path:
    """`minilm` (the packaged MiniLM), `smollm2` (the packaged SmolLM2-135M-Instruct) or a local folder
    with config.json."""
    if name_or_path in KNOWN_MODELS:
        return KNOWN_MODELS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"model {name_or_path!r} is neither a known name {sorted(KNOWN_MODELS)} "
                              f"nor a local folder with config.json")
    return path.resolve()


def model_name(name_or_path: str) -> str:
    if "=" in name_or_path:
        return name_or_path.split("=", 1)[0]
    return name_or_path if name_or_path in KNOWN_MODELS else Path(name_or_path).name


@dataclass(frozen=True)
class ModelSpec:
    name: str            # what tenants, domains and replicas call it
    directory: Path


def parse_model_specs(values: list[str] | str | None) -> list[ModelSpec]:
    """`NAME=DIR`, a known name (`minilm`, `smollm2`) or a folder (named after it), repeated or
    comma-separated; the first is the deployment's default model."""
    items = [values] if isinstance(values, str) else list(values or [])
    entries = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not entries:
        raise InvalidArgument("no base model given: --model NAME=DIR (or minilm, smollm2) [HMI_MODEL]")
    specs: list[ModelSpec] = []
    for entry in entries:
        name, _, location = entry.partition("=")
        if not location:
            name, location = model_name(entry), entry
        if not name or not all(c.isalnum() or c in "._-" for c in name):
            raise InvalidArgument(f"model name {name!r} in {entry!r}: use letters, digits, '.', '_' or '-'")
        if any(spec.name == name for spec in specs):
            raise InvalidArgument(f"model {name!r} is given twice")
        specs.append(ModelSpec(name, resolve_model_dir(location)))
    return specs
