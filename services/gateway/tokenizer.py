"""Text -> token ids with the base model's fast tokenizer, with the limits a request must respect."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.loading import load_tokenizer
from services.common.errors import InvalidArgument

CHARS_PER_TOKEN = 16     # default character cap per text: 16 characters per token of --max-sequence-tokens


class TextEncoder:
    """Characters are capped before tokenising (tokenising is the gateway's costliest step per byte: a request
    of 256 texts of 100,000 characters used to hold it for 20 s): a text longer than `max_text_chars` is
    refused, or with `truncate` cut to that many characters first (its head, ample for `max_sequence_tokens`
    tokens of ordinary text); all texts of a request together may hold `max_request_chars`."""

    def __init__(self, model_dir: Path, *, max_sequence_tokens: int, max_texts: int, max_text_chars: int = 0,
                 max_request_chars: int = 1 << 18):
        self.tokenizer = load_tokenizer(model_dir)
        self.max_sequence_tokens = max_sequence_tokens
        self.max_texts = max_texts
        self.max_text_chars = max_text_chars or CHARS_PER_TOKEN * max_sequence_tokens
        self.max_request_chars = max_request_chars

    def _checked(self, texts: list[str], truncate: bool) -> list[str]:
        """The texts within the request's limits (with `truncate`: each cut to `max_text_chars`)."""
        if not texts:
            raise InvalidArgument("give at least one text")
        if len(texts) > self.max_texts:
            raise InvalidArgument(f"{len(texts)} texts in one request exceed the limit of {self.max_texts}; "
                                  f"split the request")
        texts = list(texts)
        sent = sum(len(text) for text in texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidArgument(f"text {index} is not a string")
            if not text.strip():
                raise InvalidArgument(f"text {index} is empty")
            if len(text) > self.max_text_chars:
                if not truncate:
                    raise InvalidArgument(f"text {index} has {len(text)} characters, above the limit of "
                                          f"{self.max_text_chars} (the gateway's --max-text-chars); shorten it or set "
                                          f"truncate")
                texts[index] = text[:self.max_text_chars]
        total = sum(len(text) for text in texts)
        if total > self.max_request_chars:
            cut = f" ({total:,} once each was cut to --max-text-chars)" if total != sent else ""
            raise InvalidArgument(f"the request's texts hold {sent:,} characters{cut}, above the limit of "
                                  f"{self.max_request_chars:,} per request (the gateway's --max-request-chars); split "
                                  f"the request")
        return texts

    def tokenize(self, texts: list[str], add_special_tokens: bool = True) -> list:
        """The tokenizer's encodings of texts within the request's limits (no token limit: counting tokens is
        what a caller may want to learn)."""
        return self.tokenizer.encode_batch(self._checked(texts, truncate=False), add_special_tokens=add_special_tokens)

    def encode(self, texts: list[str], truncate: bool = False) -> list[np.ndarray]:
        """Over-long texts are refused, or with `truncate` keep their head and final [SEP] (as training does)."""
        texts = self._checked(texts, truncate)
        encodings = self.tokenizer.encode_batch(texts)
        result = []
        for index, encoding in enumerate(encodings):
            if len(encoding.ids) > self.max_sequence_tokens and truncate:
                ids = encoding.ids[:self.max_sequence_tokens - 1] + encoding.ids[-1:]
                result.append(np.asarray(ids, dtype=np.int32))
                continue
            if len(encoding.ids) > self.max_sequence_tokens:
                raise InvalidArgument(f"text {index} is {len(encoding.ids)} tokens long, above the maximum of "
                                      f"{self.max_sequence_tokens} tokens (special tokens included); shorten it or "
                                      f"set truncate")
            result.append(np.asarray(encoding.ids, dtype=np.int32))
        return result
