"""The names and metadata of HMI's adapter format (hmi-lora-v1), without torch: what the serving parser
(adapter_format.py) and the PEFT conversion (peft_format.py, numpy only) both read a file by."""
from __future__ import annotations

import json
import re
import struct

from hmi_errors import InvalidArgument

FORMAT = "hmi-lora-v1"
TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_gate", "ffn_out")   # ffn_gate: gated MLPs only
DEFAULT_TARGETS = ("query", "value")
_NAME = re.compile(r"^layers\.(\d+)\.([a-z_]+)\.lora_([AB])$")


def lora_name(layer: int, target: str, which: str) -> str:
    """The tensor name of a LoRA factor: `layers.{layer}.{target}.lora_{A|B}`."""
    return f"layers.{layer}.{target}.lora_{which}"


def parse_lora_name(name: str) -> tuple[int, str, str] | None:
    """(layer, target, "A" | "B") of a LoRA factor's name; None for anything else (the head's tensors)."""
    match = _NAME.match(name)
    return None if match is None else (int(match[1]), match[2], match[3])


def read_metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (format, rank, alpha), checked before anything is parsed."""
    if len(data) < 8:
        raise InvalidArgument("adapter file is not safetensors: shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(len(data) - 8, 100 << 20):
        raise InvalidArgument("adapter file is not safetensors: header length exceeds the file")
    try:
        header = json.loads(data[8:8 + header_len])
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument(f"adapter file is not safetensors: bad header ({error})") from error
    if not isinstance(header, dict):
        raise InvalidArgument("adapter file is not safetensors: its header is not a JSON object")
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
