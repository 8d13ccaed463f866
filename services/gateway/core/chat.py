"""Chat messages -> a prompt, with the chat template of the tenant's base model (its tokenizer's, rendered
by transformers as the model's authors meant it). Loaded once per model, on its first chat request."""
from __future__ import annotations

import threading
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument

ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatTemplates:
    def __init__(self, model_dirs: dict[str, Path], prompt_tokenizers: dict[str, object]) -> None:
        self.model_dirs = model_dirs
        self.prompt_tokenizers = prompt_tokenizers    # the gateway's tokenizers, which encode the prompt later
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def _tokenizer(self, model: str):
        with self._lock:
            if model not in self._loaded:
                from transformers import AutoTokenizer
                self._loaded[model] = AutoTokenizer.from_pretrained(str(self.model_dirs[model]),
                                                                    local_files_only=True)
            return self._loaded[model]

    def render(self, model: str, messages: list[dict]) -> str:
        """The prompt text for `messages` ({"role", "content"}), ending where the assistant's answer starts."""
        if not messages:
            raise InvalidArgument("messages must hold at least one message")
        for index, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise InvalidArgument(f"messages[{index}].role must be one of {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise InvalidArgument(f"messages[{index}].content must be text")
        tokenizer = self._tokenizer(model)
        if not getattr(tokenizer, "chat_template", None):
            raise FailedPrecondition(f"base model {model!r} has no chat template (tokenizer_config.json's "
                                     f"chat_template): use /v1/completions with a prompt of your own")
        try:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja's raise_exception)
            raise InvalidArgument(f"the chat template of {model!r} refused the messages: {error}") from error
        # The gateway encodes the prompt with the model's fast tokenizer, whose post-processor may add BOS
        # itself: a template that writes BOS as text would then give it twice.
        bos = getattr(tokenizer, "bos_token", None)
        encoder = self.prompt_tokenizers.get(model)
        if bos and prompt.startswith(bos) and encoder is not None:
            empty = encoder.encode("").ids
            if empty and empty[0] == tokenizer.convert_tokens_to_ids(bos):
                prompt = prompt[len(bos):]
        return prompt
