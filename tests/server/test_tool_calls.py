"""Tool calls read from a model's text as it streams (Hermes' <tool_call> blocks, Llama 3.1's JSON),
and the grammar that makes a model write one; the templates of tests/templates render as
transformers' apply_chat_template renders them."""

import json

import pytest

from llama_lite.engine.constraints import Grammars
from llama_lite.engine.sampling import SamplingParams
from llama_lite.server.tool_calls import HERMES, JSON, CallParser, call_format, call_grammar
from llama_lite.text.chat_template import render_chat, takes_tools
from tests.conftest import TESTS

TEMPLATES = TESTS / "templates"
WEATHER = {"name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city"], "additionalProperties": False}}
CLOCK = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


def streamed(fmt, text, names=("get_weather", "get_time")):
    """(content shown while streaming a character at a time, content at the end, calls)."""
    parser = CallParser(fmt, names)
    shown = "".join(parser.feed(c) for c in text)
    rest, calls = parser.finish()
    return shown, rest, calls


def test_hermes_calls_after_text_are_held_back_and_parsed():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>'
    shown, rest, calls = streamed(HERMES, text)
    assert shown == "Let me check.\n" and rest == ""  # no piece of "<tool_call>" is ever shown
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "get_time", "arguments": "{}"}]


@pytest.mark.parametrize("text", [
    "a < b, and <tool is not a tag",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',  # cut short (max_tokens)
    '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',  # not a function offered
    '<tool_call>\n{"name": "get_weather" "arguments": {}}\n</tool_call>',  # not JSON
    '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call> and then some words',
])
def test_hermes_text_that_is_not_wholly_calls_stays_content(text):
    shown, rest, calls = streamed(HERMES, text)
    assert shown + rest == text and calls == []


def test_llama31_json_calls():
    for text in ['{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}',
                 ' <|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}']:
        assert streamed(JSON, text) == ("", "", [{"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}])
    assert streamed(JSON, "It is sunny.") == ("It is sunny.", "", [])  # shown at once: it does not start a call
    for text in ['{"answer": 42}', '{"name": "get_weather", "parameters": [1]}', "<|pyth"]:
        assert streamed(JSON, text) == ("", text, [])  # held while it could be a call, then content


def test_call_format_and_tools_taken_by_the_templates(llm):
    hermes, llama31 = (TEMPLATES / "chatml_tools.jinja").read_text(), (TEMPLATES / "llama31_tools.jinja").read_text()
    assert (call_format(hermes), call_format(llama31)) == (HERMES, JSON)
    assert takes_tools(hermes) and takes_tools(llama31) and not takes_tools(llm.tokenizer.chat_template)


@pytest.mark.parametrize("fmt, good, bad", [
    # compact JSON, as forced calls are written by default (issue 33)
    (HERMES, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome","days":3}}\n</tool_call>',
     '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome","days":9}}\n</tool_call>'),
    (JSON, '{"name":"get_time","parameters":{}}', '{"name":"get_weather","parameters":{}}'),  # city is required
])
def test_the_call_grammar_takes_valid_calls_only(llm, fmt, good, bad):
    grammars = Grammars(llm.tokenizer, llm.model.params.vocab_size)
    params = SamplingParams(grammar=call_grammar(fmt, [WEATHER, CLOCK]))

    def accepts(text):
        matcher = grammars.matcher(params)
        return matcher.consume_tokens(llm.tokenizer.encode(text, bos=False, eos=False)) and matcher.is_accepting()

    assert accepts(good) and not accepts(bad)
    assert streamed(fmt, good)[2][0]["name"] in ("get_weather", "get_time")


@pytest.mark.parametrize("name, bos", [("chatml_tools.jinja", ""), ("llama31_tools.jinja", "<|begin_of_text|>")])
def test_tool_templates_render_as_transformers_renders_them(name, bos):
    """Tools, a call and a tool's answer rendered by our sandbox equal transformers' rendering (its
    tojson, its way of passing tools)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    template = (TEMPLATES / name).read_text()
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token=bos or None)
    reference.chat_template = template
    tools = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]
    dialog = [{"role": "system", "content": "Be brief <and> exact."}, {"role": "user", "content": "Weather in Zürich?"},
              {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                  "name": "get_weather", "arguments": {"city": "Zürich"}}}]},
              {"role": "tool", "content": json.dumps({"temp": 21}), "tool_call_id": "call_1"}]
    want = reference.apply_chat_template(dialog, tools=tools, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, dialog, bos_token=bos, tools=tools) == want
    assert "Zürich" in want and "\\u003c" not in want
