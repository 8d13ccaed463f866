"""Structured output: every generated text matches its pattern (checked by parsing it, not by the library that
constrained it), a pattern that cannot be used is refused with the reason, and the vocabulary's bytes equal
what the tokenizer itself decodes. Tiny random-weight decoders (tests/helpers.py): unconstrained, their text is
noise, so valid JSON out of them is the constraint's doing."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from models.adapter_format import random_adapter
from models.decoder import DecoderModel
from services.common.errors import FailedPrecondition, InvalidArgument
from services.compute.adapter_pool import AdapterPool
from services.compute.constrained_output import OutputConstraints, token_bytes
from services.compute.generation import GenerationEngine
from services.compute.generation_scheduler import GenerationRequest, SamplingParams
from services.gateway.structured_output import OutputFormat, escaped, from_openai, output_pattern

EOS = 2     # the tiny decoders' </s>
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"},
                                           "size": {"enum": ["small", "large"]}},
          "required": ["name", "ok", "size"]}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder_dir(request, tmp_path_factory):
    from tests.helpers import tiny_decoder
    return tiny_decoder(request.param, tmp_path_factory.mktemp(f"structured-{request.param}"))


@pytest.fixture(scope="module")
def engine(decoder_dir):
    model = DecoderModel(decoder_dir, torch.device("cpu"))
    adapter = random_adapter(model.dims, num_labels=0, rank=4, first_layer=0, targets=("query", "value"), seed=1)
    pool = AdapterPool(model.dims, torch.device("cpu"), slots=4, max_rank=8, host_cache_bytes=16 << 20,
                       fetch=lambda tenant, version: adapter)
    engine = GenerationEngine(model, pool, None, kv_budget_bytes=16 << 20,
                              constraints=OutputConstraints(decoder_dir, EOS, model.dims.vocab))
    yield engine
    engine.close()


def generated(engine, decoder_dir, pattern: str, *, prompt=(5, 6, 7), new_tokens: int = 100, **params) -> tuple:
    stream = engine.submit(GenerationRequest("t", 1, "", 0, np.asarray(prompt), SamplingParams(
        max_new_tokens=new_tokens, stop_token_ids=(EOS,), output_pattern=pattern, **params)))
    tokens = list(stream)
    text = Tokenizer.from_file(str(decoder_dir / "tokenizer.json")).decode(tokens, skip_special_tokens=True)
    return text, tokens, stream.finish_reason


def test_json_schema_output_parses_and_follows_the_schema(engine, decoder_dir):
    pattern = output_pattern(OutputFormat("json_schema", json.dumps(SCHEMA)))
    for params in ({}, {"temperature": 1.0, "seed": 7}, {"temperature": 1.5, "top_p": 0.9, "seed": 3}):
        text, tokens, reason = generated(engine, decoder_dir, pattern, **params)
        assert reason == "stop" and tokens[-1] == EOS, (text, reason)
        value = json.loads(text)
        assert set(value) == {"name", "ok", "size"}, text
        assert isinstance(value["name"], str) and len(value["name"]) <= 6
        assert isinstance(value["ok"], bool) and value["size"] in ("small", "large")


def test_without_a_pattern_the_same_model_writes_no_json(engine, decoder_dir):
    stream = engine.submit(GenerationRequest("t", 1, "", 0, np.asarray([5, 6, 7]), SamplingParams(
        max_new_tokens=30, stop_token_ids=(EOS,))))
    text = Tokenizer.from_file(str(decoder_dir / "tokenizer.json")).decode(list(stream), skip_special_tokens=True)
    with pytest.raises(ValueError):
        json.loads(text)


def test_regex_choice_and_free_json_object(engine, decoder_dir):
    text, _tokens, reason = generated(engine, decoder_dir, r"[0-9]{3}-[a-z]{2}")
    assert reason == "stop" and re.fullmatch(r"[0-9]{3}-[a-z]{2}", text), text
    choices = ["yes (sure)", "no.", "a|b"]
    for seed in range(3):
        text, _tokens, _reason = generated(engine, decoder_dir, output_pattern(OutputFormat("choice",
                                                                                            choices=tuple(choices))),
                                           temperature=1.0, seed=seed)
        assert text in choices
    # A complete match that may still go on (`a{1,3}` after `a`): the guide follows every token
    for seed in range(6):
        for pattern in (r"x{1,3}", r"(ab)+c?"):
            text, _tokens, reason = generated(engine, decoder_dir, pattern, new_tokens=12, temperature=2.0, seed=seed)
            assert re.fullmatch(pattern, text) or (reason == "length" and re.fullmatch(r"(ab)+c?|(ab)*a?", text)), text
    # A text cut short by max_new_tokens ends with "length" and is a prefix of valid output only
    text, tokens, reason = generated(engine, decoder_dir, r"a{50}", new_tokens=5)
    assert reason == "length" and len(tokens) == 5 and set(text) == {"a"}


def test_a_pattern_that_cannot_be_used_is_refused_with_the_reason(engine, decoder_dir):
    for pattern, message in (("(", "cannot be used"), ("x" * 70_000, "above the limit")):
        with pytest.raises(InvalidArgument, match=message):
            generated(engine, decoder_dir, pattern)
    with pytest.raises(InvalidArgument, match="ignore_eos"):
        engine.submit(GenerationRequest("t", 1, "", 0, np.asarray([5]), SamplingParams(
            max_new_tokens=4, stop_token_ids=(), output_pattern="a")))
    bare = GenerationEngine(engine.model, engine.pool, None, kv_budget_bytes=1 << 20)
    try:
        with pytest.raises(FailedPrecondition, match="no tokenizer"):
            bare.submit(GenerationRequest("t", 1, "", 0, np.asarray([5]), SamplingParams(
                max_new_tokens=4, stop_token_ids=(EOS,), output_pattern="a")))
    finally:
        bare.close()
    # The engine still serves after every refusal
    text, _tokens, _reason = generated(engine, decoder_dir, "ok")
    assert text == "ok"


def test_a_compiled_pattern_is_reused(engine):
    constraints = engine.constraints
    before = constraints.compiled
    constraints.index("cached-[0-9]")
    constraints.index("cached-[0-9]")
    assert constraints.compiled == before + 1


def test_vocabulary_bytes_are_what_the_tokenizer_decodes(decoder_dir):
    tokenizer = Tokenizer.from_file(str(decoder_dir / "tokenizer.json"))
    table = token_bytes(json.loads((decoder_dir / "tokenizer.json").read_text()))
    ids = {token_id: raw for raw, token_ids in table.items() for token_id in token_ids}
    assert EOS not in ids and len(ids) == tokenizer.get_vocab_size() - 3     # every token but <pad> <s> </s>
    checked = 0
    for token_id, raw in ids.items():
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue       # part of a character: the tokenizer's decode shows U+FFFD for it
        assert tokenizer.decode([token_id]) == text
        checked += 1
    assert checked > 200


def test_sentencepiece_byte_fallback_tokens_read_as_bytes():
    document = {"model": {"vocab": {"<unk>": 0, "<0x41>": 1, "\u2581hi": 2, "ok": 3, "</s>": 4}},
                "added_tokens": [{"id": 4, "content": "</s>", "special": True}],
                "decoder": {"type": "Sequence", "decoders": [{"type": "Replace"}, {"type": "ByteFallback"}]}}
    assert token_bytes(document) == {b"<unk>": [0], b"A": [1], b" hi": [2], b"ok": [3]}
    with pytest.raises(FailedPrecondition, match="cannot read"):
        token_bytes({"model": {"vocab": {"a": 0}}, "decoder": {"type": "WordPiece"}})


def test_the_doors_formats_become_one_pattern():
    assert from_openai(None) is None and from_openai({"type": "text"}) is None
    assert from_openai({"type": "json_object"}) == OutputFormat("json_object")
    schema = from_openai({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}})
    assert schema.kind == "json_schema" and json.loads(schema.value) == SCHEMA
    assert from_openai(None, guided_json=json.dumps(SCHEMA)).value == json.dumps(SCHEMA)
    assert from_openai(None, guided_regex="a+") == OutputFormat("regex", "a+")
    assert from_openai(None, guided_choice=["a", "b"]) == OutputFormat("choice", choices=("a", "b"))
    for bad, message in (({"type": "json_schema"}, "json_schema.schema"), ({"type": "xml"}, "not supported")):
        with pytest.raises(InvalidArgument, match=message):
            from_openai(bad)
    with pytest.raises(InvalidArgument, match="at most one"):
        from_openai({"type": "json_object"}, guided_regex="a")
    for output, message in ((OutputFormat("json_schema", "{not json"), "not valid JSON"),
                            (OutputFormat("json_schema", "[1]"), "must be a JSON object"),
                            (OutputFormat("choice", choices=()), "choices"),
                            (OutputFormat("regex", ""), "empty"), (OutputFormat("yaml"), "unknown")):
        with pytest.raises(InvalidArgument, match=message):
            output_pattern(output)
    literal = "a.b|c (d) [e] {f} ^$ \\ #&-~ *+?"
    assert re.fullmatch(escaped(literal), literal) and not re.fullmatch(escaped("a.b"), "axb")
