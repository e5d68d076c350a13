"""A JSON Schema (or regex, or grammar) that no value satisfies is refused before any token, naming
why (issue 33: `{"$ref": "#"}` as response_format was a 200 with empty content); recursive schemas
that can end are kept, and the real model's outputs under them validate."""

import json

import pytest

from llama_lite import SamplingParams
from llama_lite.server.app import create_app
from tests.engine.test_engine import collect

jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
from starlette.testclient import TestClient  # noqa: E402 (needs httpx)

MODEL = "SmolLM2-135M-Instruct"
LOOP = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
ENDLESS_LIST = {"type": "object", "properties": {"value": {"type": "integer"}, "next": {"$ref": "#"}},
                "required": ["value", "next"]}
UNSATISFIABLE = [
    ({"$ref": "#"}, "refers back to itself with no way to end ($ref #)"),
    (LOOP, "no way to end ($ref #/$defs/a, #/$defs/b)"),
    (json.dumps(LOOP), "no way to end"),  # as JSON text
    (ENDLESS_LIST, "no way to end ($ref #)"),
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "make the recursion optional"),
    ({"$defs": {"e": {"anyOf": [{"type": "object", "properties": {"x": {"$ref": "#/$defs/e"}}, "required": ["x"]},
                                {"type": "array", "prefixItems": [{"$ref": "#/$defs/e"}], "minItems": 1}]}},
      "$ref": "#/$defs/e"}, "no way to end ($ref #/$defs/e)"),
    ({"not": {}}, '"not": {} accepts no value'),
    (False, "false accepts no value"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "incompatible types"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems (3) is greater than maxItems (1)"),
    ({"type": "number", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "contains no integer values"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength (5) is greater than maxLength (2)"),
    ({"enum": []}, "anyOf is empty"),
    ({"type": []}, "anyOf is empty"),
    ({"type": "string", "enum": [1, 2]}, "incompatible types"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False},
     "required property 'b' is unsatisfiable"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "required property 'a' is unsatisfiable"),
    ({"type": "object", "required": ["a", "b"], "maxProperties": 1}, "required > maxProperties"),
    ({"type": "integer", "multipleOf": 10, "minimum": 1, "maximum": 9}, "does not contain a multiple of 10"),
]
RECURSIVE_BUT_FINITE = [
    {"type": "object", "properties": {"value": {"type": "integer"}, "next": {"$ref": "#"}}, "required": ["value"]},
    {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                                  "maxItems": 2}}, "required": ["kids"]}},
     "$ref": "#/$defs/node"},
    {"$defs": {"e": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"$ref": "#/$defs/e"}, "minItems": 1,
                                                     "maxItems": 2}]}}, "$ref": "#/$defs/e"},
]


@pytest.mark.parametrize("schema, why", UNSATISFIABLE)
def test_a_schema_nothing_satisfies_is_refused_naming_why(llm, schema, why):
    with pytest.raises(ValueError) as info:
        SamplingParams(json_schema=schema)
    message = str(info.value)
    assert message.startswith("no value satisfies SamplingParams.json_schema: ") and why in message, message
    assert "\n" not in message
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kind, value", [("grammar", "start: start"), ("grammar", 'start: b\nb: b c\nc: "x"'),
                                         ("regex", r"[^\s\S]"), ("regex", r"x[^\x00-\U0010FFFF]")])
def test_a_grammar_or_regex_that_admits_no_text_is_refused(kind, value):
    with pytest.raises(ValueError, match=rf"^no text matches SamplingParams\.{kind}: it admits no text at all"):
        SamplingParams(**{kind: value})


@pytest.mark.parametrize("grammar", ['start: "yes" <|im_end|>', 'start: "no" <[2]>'])
def test_a_grammar_naming_the_models_tokens_is_kept(llm, grammar):
    """The no-text check reads bytes, which know no special tokens: such grammars are left to the
    model's vocabulary, which has them."""
    assert llm.engine.grammars.matcher(SamplingParams(grammar=grammar)) is not None


def test_recursion_that_can_end_is_kept_and_validates(llm):
    """Optional recursion, a tree whose arrays may be empty, an anyOf with a base case: accepted, and
    the model's greedy outputs under them are valid."""
    prompt = llm.chat_prompt_tokens([{"role": "user", "content": "Answer with one JSON value."}])
    params = [SamplingParams(temperature=0, max_tokens=64, json_schema=schema) for schema in RECURSIVE_BUT_FINITE]
    done = collect(llm.engine, [llm.engine.add(prompt, p) for p in params])
    for schema, (_, text, reason, _, _) in zip(RECURSIVE_BUT_FINITE, done.values()):
        if reason == "stop":
            jsonschema.validate(json.loads(text), schema)
        assert text, schema  # never empty for want of a value


@pytest.mark.parametrize("schema, why", [({"$ref": "#"}, "no way to end ($ref #)"), (LOOP, "no way to end"),
                                         (False, "false accepts no value")])
def test_the_server_answers_400_before_any_token(llm, schema, why):
    """Through the openai client: an OpenAI-shaped 400 on response_format, where it was a 200 with
    empty content."""
    with TestClient(create_app(llm, MODEL)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "x", "schema": schema}})
    error = info.value.body
    assert error["param"] == "response_format" and why in error["message"], error
    assert error["message"].startswith("no value satisfies response_format.json_schema.schema: ")
    assert not llm.engine.has_unfinished()
