"""Structured output: generated tokens kept to a regular expression (JSON schemas become one at the gateway).

outlines-core does the work: an `Index` is the regex compiled against the decoder's vocabulary (every token's
bytes), a `Guide` walks it token by token and writes the allowed tokens as a bitmask. Indexes are cached per
pattern (a JSON schema of a few fields compiles in milliseconds, a free-form JSON object in seconds), so a
tenant that sends the same schema with every request compiles it once per replica. Compiling happens in the
caller's thread (the RPC's), never in the step loop.

The mask applies to the sampled distribution only; reported log-probabilities stay the model's own (as for
penalties). In a final state end-of-text is among the allowed tokens, and once nothing else is, it is the
only one: the sequence ends with "stop" as soon as the output is complete.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

import torch

from services.common.errors import FailedPrecondition, InvalidArgument

MAX_PATTERN_CHARS = 65_536      # a regex longer than this is refused (a JSON schema's regex is a few KiB)
CACHED_INDEXES = 64             # compiled patterns kept per replica (LRU)
log = logging.getLogger("hmi.compute.constrained_output")


def _gpt2_byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for every byte (GPT-2's bytes_to_unicode), reversed."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {part.get("type", "") for part in decoder.get("decoders", [])}
    return {decoder.get("type", "")}


def token_bytes(tokenizer_json: dict) -> dict[bytes, list[int]]:
    """The bytes each ordinary token stands for, as outlines-core's Vocabulary takes them (special tokens left
    out: structured output never contains them). Byte-level BPE (GPT-2, Llama 3, SmolLM2) and SentencePiece
    with byte fallback (Llama 2, Mistral) are read; any other tokenizer cannot be constrained byte-exactly."""
    vocab: dict[str, int] = tokenizer_json.get("model", {}).get("vocab") or {}
    if not isinstance(vocab, dict) or not vocab:
        raise FailedPrecondition("structured output needs a BPE tokenizer with a vocabulary in tokenizer.json")
    special = {token["id"] for token in tokenizer_json.get("added_tokens", []) if token.get("special")}
    kinds = _decoder_types(tokenizer_json.get("decoder"))
    result: dict[bytes, list[int]] = {}
    if "ByteLevel" in kinds:
        byte_of = _gpt2_byte_decoder()
        for token, token_id in vocab.items():
            if token_id in special or any(char not in byte_of for char in token):
                continue
            result.setdefault(bytes(byte_of[char] for char in token), []).append(token_id)
    elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        for token, token_id in vocab.items():
            if token_id in special:
                continue
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                raw = bytes([int(token[3:5], 16)])
            else:
                raw = token.replace("\u2581", " ").encode("utf-8")
            result.setdefault(raw, []).append(token_id)
    else:
        raise FailedPrecondition(f"structured output cannot read this tokenizer's tokens as bytes (decoder "
                                 f"{sorted(kinds) or 'none'}): a byte-level BPE or SentencePiece tokenizer is needed")
    return result


class OutputConstraints:
    """A replica's compiled patterns, for one decoder's vocabulary (built on first use)."""

    def __init__(self, model_dir: Path, eos_token_id: int | None, vocab_size: int) -> None:
        self.model_dir = model_dir
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size      # the logits' width (may exceed the tokenizer's)
        self._vocabulary = None
        self._indexes: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0                 # patterns compiled since start (the rest were cache hits)

    def vocabulary(self):
        from outlines_core import Vocabulary
        with self._lock:
            if self._vocabulary is None:
                if self.eos_token_id is None:
                    raise FailedPrecondition("structured output needs the model's end-of-text token (eos_token_id "
                                             "in generation_config.json or config.json)")
                path = self.model_dir / "tokenizer.json"
                if not path.is_file():
                    raise FailedPrecondition(f"{self.model_dir} has no tokenizer.json: structured output needs it")
                self._vocabulary = Vocabulary(self.eos_token_id, token_bytes(json.loads(path.read_text())))
            return self._vocabulary

    def index(self, pattern: str):
        """The compiled pattern (InvalidArgument with the reason when it does not compile). Two requests with
        the same new pattern compile it once: the second waits for the first."""
        if not pattern:
            raise InvalidArgument("the output pattern is empty")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise InvalidArgument(f"the output pattern has {len(pattern)} characters, above the limit of "
                                  f"{MAX_PATTERN_CHARS}: simplify the schema")
        with self._lock:
            found = self._indexes.get(pattern)
            owner = found is None
            if owner:
                found = self._indexes[pattern] = Future()
                while len(self._indexes) > CACHED_INDEXES:
                    self._indexes.popitem(last=False)
            else:
                self._indexes.move_to_end(pattern)
        if owner:
            try:
                found.set_result(self._compile(pattern))
            except BaseException as error:   # noqa: BLE001 - the callers waiting for it get the same error
                with self._lock:
                    if self._indexes.get(pattern) is found:
                        del self._indexes[pattern]
                found.set_exception(error)
        return found.result()

    def _compile(self, pattern: str):
        from outlines_core import Index
        vocabulary = self.vocabulary()
        started = time.perf_counter()
        try:
            index = Index(pattern, vocabulary)
        except (ValueError, RuntimeError) as error:
            raise InvalidArgument(f"the output pattern cannot be used: {str(error)[:300]}") from None
        self.compiled += 1
        seconds = time.perf_counter() - started
        if seconds > 1.0:
            log.info("compiled an output pattern of %d characters in %.1fs", len(pattern), seconds)
        return index


class OutputGuide:
    """One sequence's walk through a compiled pattern."""

    def __init__(self, index, vocab_size: int, eos_token_id: int) -> None:
        from outlines_core import Guide
        self.guide = Guide(index)
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """[vocab_size] bool: the tokens that keep the output matching."""
        self.guide.write_mask_into(self._bits.data_ptr(), self._bits.numel(), 4)
        bits = (self._bits.unsqueeze(-1) >> self._shifts) & 1
        return bits.view(-1)[:self.vocab_size].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with every token that would break the pattern at -inf (a new tensor)."""
        return logits.masked_fill(~self.allowed(), float("-inf"))

    def advance(self, token: int) -> None:
        """Every token but end-of-text moves the guide: a complete match may still go on (`a{1,3}` after
        `a`), so the state after it matters; end-of-text ends the sequence."""
        if token != self.eos_token_id:
            self.guide.advance(token, return_tokens=False)

    @property
    def finished(self) -> bool:
        return self.guide.is_finished()
