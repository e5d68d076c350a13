"""Compact JSON by default (issue 33): where JSON allows whitespace the small model writes newlines
until max_tokens, so `json_schema`, `json_object` and forced tool calls allow none, as OpenAI's
replies and json.dumps(separators=(",", ":")); a schema's "x-guidance": {"whitespace_flexible": true}
opts in to whitespace, at most 20 characters at each place."""

import json

import numpy as np
import pytest

from llama_lite import SamplingParams
from llama_lite.engine.constraints import _byte_tokenizer, compile_constraint
from llama_lite.server.tool_calls import HERMES, call_grammar
from tests.engine.test_engine import collect

jsonschema = pytest.importorskip("jsonschema")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "student": {"type": "boolean"}, "city": {"type": "string", "maxLength": 20},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age", "student", "city", "hobbies"], "additionalProperties": False}
FLEXIBLE = {**PERSON, "x-guidance": {"whitespace_flexible": True}}


def run(llm, messages, params_list):
    prompt = llm.chat_prompt_tokens(messages)
    rids = [llm.engine.add(prompt, p) for p in params_list]
    done = collect(llm.engine, rids)
    return [done[rid] for rid in rids]


def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def test_a_five_field_schema_ends_as_compact_valid_json(llm):
    """Four seeds at temperature 1 and four at the default sampling, max_tokens 80 (the newlines took
    ~100 of 120 before): each ends "stop" with JSON `jsonschema` validates, written exactly as
    json.dumps writes it compactly (no newline, no space between tokens)."""
    params = [SamplingParams(temperature=1.0, top_p=1.0, seed=seed, max_tokens=80, json_schema=PERSON) for seed in range(4)]
    params += [SamplingParams(seed=seed, max_tokens=80, json_schema=PERSON) for seed in range(4)]
    for _, text, reason, _, _ in run(llm, [{"role": "user", "content": "Invent a person as JSON."}], params):
        assert reason == "stop", text
        value = json.loads(text)
        jsonschema.validate(value, PERSON, format_checker=jsonschema.FormatChecker())
        assert "\n" not in text and text == compact(value)


def whitespace_between_tokens(text: str) -> str:
    """The whitespace of a JSON text (whole or cut short) outside its strings."""
    found, in_string, escaped = [], False, False
    for ch in text:
        if in_string:
            in_string, escaped = (escaped or ch != '"'), (not escaped and ch == "\\")
        elif ch == '"':
            in_string = True
        elif ch.isspace():
            found.append(ch)
    return "".join(found)


def test_json_object_and_a_forced_tool_call_are_compact(llm):
    """json_object (which runs on to max_tokens here, so it is checked as far as it got) and a forced
    Hermes call: no whitespace between JSON tokens; the call whole and equal to its compact dump."""
    call = call_grammar(HERMES, [{"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer"}},
        "required": ["city", "days"]}}])
    kinds = ({"json_object": True}, {"grammar": call})
    params = [SamplingParams(seed=seed, max_tokens=48, **kind) for seed in (0, 1) for kind in kinds]
    results = run(llm, [{"role": "user", "content": "Weather in Paris for 3 days, as JSON."}], params)
    for (_, obj, _, _, _), (_, tool, tool_reason, _, _) in zip(results[::2], results[1::2]):
        assert obj.startswith("{") and whitespace_between_tokens(obj) == "", obj
        assert tool_reason == "stop", tool
        body = tool.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")
        assert body == compact(json.loads(body)) and json.loads(body)["name"] == "get_weather"


def allowed_after(schema, text: str) -> bytes:
    """The bytes the schema's grammar allows after `text` (a byte-level vocabulary)."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), compile_constraint("json_schema", schema), log_level=0)
    assert all(matcher.consume_token(b) for b in text.encode())
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    return bytes(b for b in range(256) if bits[b])


def test_whitespace_is_an_opt_in_and_stays_bounded():
    assert allowed_after(PERSON, "{") == b'"' and allowed_after(PERSON, '{"name"') == b":"
    assert b"\n" in allowed_after(FLEXIBLE, "{") and b" " in allowed_after(FLEXIBLE, '{"name"')
    assert b" " in allowed_after(FLEXIBLE, "{" + " " * 19) and b" " not in allowed_after(FLEXIBLE, "{" + " " * 20)
    pattern = {**PERSON, "x-guidance": {"whitespace_pattern": " ?"}}  # a schema's own pattern is kept
    assert b" " in allowed_after(pattern, "{") and b" " not in allowed_after(pattern, "{ ")
