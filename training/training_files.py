"""Training files as tenants upload them (JSONL), parsed the same way where they are validated (the store, at
upload and job creation) and where they are trained on (compute), so a file the store accepted never fails later.

    classifier: {"text": ..., "label": ...}                 one example per line
    generator:  {"prompt": ..., "completion": ...}          or OpenAI chat: {"messages": [{"role", "content"}, ...]}

Every error names the line, so a person can fix the file."""
from __future__ import annotations

import json
from dataclasses import dataclass

from hmi_errors import InvalidArgument

CLASSIFIER = "classifier"
GENERATOR = "generator"
MAX_FIELD_CHARS = 100_000
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: str
    line: int = 0                    # where it stands in the file, for errors


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str                      # for chat lines: the conversation before the last assistant turn
    completion: str
    line: int = 0


@dataclass
class TrainingFile:
    kind: str                        # CLASSIFIER or GENERATOR
    examples: list                   # LabeledText or PromptCompletion

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.examples}) if self.kind == CLASSIFIER else []


def _text(record: dict, field: str, line: int, allow_empty: bool = False) -> str:
    value = record.get(field)
    if not isinstance(value, str):
        raise InvalidArgument(f"line {line}: \"{field}\" must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidArgument(f"line {line}: \"{field}\" is empty")
    if len(value) > MAX_FIELD_CHARS:
        raise InvalidArgument(f"line {line}: \"{field}\" has {len(value)} characters, more than {MAX_FIELD_CHARS}")
    return value


def _chat(record: dict, line: int) -> PromptCompletion:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument(f"line {line}: \"messages\" must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise InvalidArgument(f"line {line}: messages[{index}] needs a \"role\" of {', '.join(CHAT_ROLES)}")
        turns.append((message["role"], _text(message, "content", line, allow_empty=True)))
    if turns[-1][0] != "assistant" or not turns[-1][1].strip():
        raise InvalidArgument(f"line {line}: the last message must be the assistant's (what the model learns "
                              f"to answer)")
    prompt = "".join(f"{role}: {content}\n" for role, content in turns[:-1]) + "assistant: "
    return PromptCompletion(prompt, turns[-1][1], line)


def _example(record: dict, line: int):
    if "messages" in record:
        return GENERATOR, _chat(record, line)
    if "prompt" in record or "completion" in record:
        return GENERATOR, PromptCompletion(_text(record, "prompt", line, allow_empty=True),
                                           _text(record, "completion", line), line=line)
    if "text" in record and "label" in record:
        label = record["label"]
        if not isinstance(label, (str, int)) or isinstance(label, bool) or not str(label).strip():
            raise InvalidArgument(f"line {line}: \"label\" must be a non-empty string (or an integer)")
        return CLASSIFIER, LabeledText(_text(record, "text", line), str(label).strip(), line)
    raise InvalidArgument(f"line {line}: expected {{\"text\", \"label\"}} (classifiers), {{\"prompt\", "
                          f"\"completion\"}} or {{\"messages\": [...]}} (generators); got the fields "
                          f"{sorted(record)[:8]}")


def parse_training_file(data: bytes, max_examples: int = 0) -> TrainingFile:
    """The file's examples; InvalidArgument naming the line for bad JSON, missing fields or mixed kinds."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"the file is not UTF-8 text (byte {error.start}); training files are JSONL") from None
    kind, examples = "", []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise InvalidArgument(f"line {number}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise InvalidArgument(f"line {number}: expected a JSON object, got {type(record).__name__}")
        line_kind, example = _example(record, number)
        if kind and line_kind != kind:
            raise InvalidArgument(f"line {number}: a {line_kind} example in a file of {kind} examples; one file "
                                  f"holds one kind")
        kind = line_kind
        examples.append(example)
        if max_examples and len(examples) > max_examples:
            raise InvalidArgument(f"the file has more than {max_examples} examples, this deployment's limit "
                                  f"(the store's --max-training-examples)")
    if not examples:
        raise InvalidArgument("the file holds no examples (one JSON object per line)")
    return TrainingFile(kind, examples)


def check_labels(parsed: TrainingFile, labels: list[str], what: str) -> None:
    """Every label of a classifier file must be one of the tenant's; the first offending line is named."""
    known = set(labels)
    for example in parsed.examples:
        if example.label not in known:
            raise InvalidArgument(f"{what}: line {example.line} has the label {example.label!r}, which is not one of "
                                  f"the tenant's labels {labels[:10]}")
