"""Structured output as the doors ask for it (OpenAI's `response_format`, vLLM's `guided_json`,
`guided_regex` and `guided_choice`, the gRPC `OutputFormat`), turned into the one regular expression compute
constrains generation with. JSON schemas become a regex through outlines-core, the library compute compiles
the regex with, so both ends read the schema the same way."""
from __future__ import annotations

import json
from dataclasses import dataclass

from services.common.errors import InvalidArgument

KINDS = ("json_object", "json_schema", "regex", "choice")
MAX_SCHEMA_CHARS = 32_768
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_024
# A free-form JSON object: outlines-core's regex for {"type": "object"} (nesting bounded, as regexes must be).
JSON_OBJECT_SCHEMA = '{"type": "object"}'
_REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~")


@dataclass(frozen=True)
class OutputFormat:
    kind: str                        # one of KINDS
    value: str = ""                  # json_schema: the schema as JSON text; regex: the pattern
    choices: tuple[str, ...] = ()    # choice: the output is exactly one of these


def escaped(text: str) -> str:
    """`text` as a literal in the regex dialect outlines-core reads (Rust's regex-syntax)."""
    return "".join("\\" + char if char in _REGEX_SPECIAL else char for char in text)


def output_pattern(output: OutputFormat) -> str:
    """The regex every generated text must match; InvalidArgument names what is wrong with the request."""
    from outlines_core.json_schema import build_regex_from_schema
    if output.kind == "json_object":
        return build_regex_from_schema(JSON_OBJECT_SCHEMA)
    if output.kind == "json_schema":
        if len(output.value) > MAX_SCHEMA_CHARS:
            raise InvalidArgument(f"the JSON schema has {len(output.value)} characters, above the limit of "
                                  f"{MAX_SCHEMA_CHARS}")
        try:
            schema = json.loads(output.value)
        except ValueError as error:
            raise InvalidArgument(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise InvalidArgument("the JSON schema must be a JSON object")
        try:
            return build_regex_from_schema(json.dumps(schema))
        except (ValueError, TypeError, RuntimeError) as error:
            raise InvalidArgument(f"the JSON schema cannot be used for structured output: {str(error)[:300]}") from None
    if output.kind == "regex":
        if not output.value:
            raise InvalidArgument("the output regex is empty")
        return output.value
    if output.kind == "choice":
        if not 1 <= len(output.choices) <= MAX_CHOICES or any(not c or len(c) > MAX_CHOICE_CHARS
                                                              for c in output.choices):
            raise InvalidArgument(f"give 1..{MAX_CHOICES} choices of 1..{MAX_CHOICE_CHARS} characters each")
        return "|".join(f"({escaped(choice)})" for choice in output.choices)
    raise InvalidArgument(f"unknown output format {output.kind!r}: one of {', '.join(KINDS)}")


def from_openai(response_format: dict | None, guided_json=None, guided_regex: str | None = None,
                guided_choice: list | None = None) -> OutputFormat | None:
    """OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}})
    or one of vLLM's guided_* extras; at most one of them."""
    given = []
    if response_format:
        kind = response_format.get("type", "text") if isinstance(response_format, dict) else None
        if kind == "json_object":
            given.append(OutputFormat("json_object"))
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidArgument("response_format json_schema needs json_schema.schema, a JSON schema object")
            given.append(OutputFormat("json_schema", json.dumps(schema)))
        elif kind != "text":
            raise InvalidArgument(f"response_format type {kind!r} is not supported: text, json_object or json_schema")
    if guided_json is not None:
        if not isinstance(guided_json, (dict, str)):
            raise InvalidArgument("guided_json must be a JSON schema (an object, or its JSON text)")
        given.append(OutputFormat("json_schema", guided_json if isinstance(guided_json, str)
                                  else json.dumps(guided_json)))
    if guided_regex is not None:
        given.append(OutputFormat("regex", guided_regex))
    if guided_choice is not None:
        if not isinstance(guided_choice, list) or not all(isinstance(c, str) for c in guided_choice):
            raise InvalidArgument("guided_choice must be a list of strings")
        given.append(OutputFormat("choice", choices=tuple(guided_choice)))
    if len(given) > 1:
        raise InvalidArgument("give at most one of response_format, guided_json, guided_regex and guided_choice")
    return given[0] if given else None
