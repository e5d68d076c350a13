"""Tool calls at their edges: a function without parameters is called with `{}`, and a call cut
short by max_tokens comes back as OpenAI's partial call (finish "length"), never as the template's
markup, whole or streamed."""

import pytest

from llama_lite.server.tool_calls import HERMES, JSON, CallParser, call_grammar, parameters_of
from tests.server.test_server import MODEL, TEMPLATES, WEATHER, hermes_reply, start_server, stop_server

openai = pytest.importorskip("openai")

PING = {"type": "function", "function": {"name": "ping", "description": "Check that the network is up"}}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]


@pytest.fixture(scope="module")
def tools_client():
    """SmolLM2 served with tests/templates/chatml_tools.jinja (Hermes / Qwen2.5 format), as test_server's."""
    proc, url = start_server("--max_batch_size", 4, "--chat_template", TEMPLATES / "chatml_tools.jinja", max_seq_len=1024)
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    stop_server(proc)


@pytest.mark.parametrize("parameters", [None, {}, {"type": "object"}, {"type": "object", "properties": {}}])
def test_a_function_without_parameters_is_called_with_an_empty_object(tools_client, parameters):
    ping = PING if parameters is None else {"type": "function", "function": {**PING["function"], "parameters": parameters}}
    for stream in (False, True):
        reply = tools_client.chat.completions.create(model=MODEL, messages=ASK, tools=[ping], tool_choice="required",
                                                     max_tokens=40, temperature=0, stream=stream)
        if stream:
            calls = [d for chunk in reply for d in chunk.choices[0].delta.tool_calls or []]
        else:
            calls = reply.choices[0].message.tool_calls
        assert [(c.function.name, c.function.arguments) for c in calls] == [("ping", "{}")]


def test_parameters_that_name_some_are_kept():
    kept = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert parameters_of({"parameters": kept}) is kept
    assert parameters_of({"parameters": {"type": "object", "required": ["a"]}})["required"] == ["a"]


@pytest.mark.parametrize("max_tokens", [12, 20])
def test_a_forced_call_cut_by_max_tokens_is_a_partial_call(llm, tools_client, max_tokens):
    """The text the constrained request writes (in process) cut at max_tokens: the server returns
    the call's name and its arguments' text so far, finish "length", no content; streamed the same."""
    grammar = call_grammar(HERMES, [WEATHER["function"]])
    text, reason = hermes_reply(llm, ASK, [WEATHER], temperature=0, max_tokens=max_tokens, grammar=grammar)
    assert reason == "length" and text.startswith('<tool_call>\n{"name"')
    arguments_so_far = text.split('"arguments":', 1)[1].lstrip() if '"arguments":' in text else ""
    request = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=max_tokens, temperature=0)
    choice = tools_client.chat.completions.create(**request).choices[0]
    assert (choice.finish_reason, choice.message.content) == ("length", None)
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [("get_weather", arguments_so_far)]
    chunks = [c.choices[0] for c in tools_client.chat.completions.create(stream=True, **request)]
    assert "".join(c.delta.content or "" for c in chunks) == ""  # no markup shown while streaming
    deltas = [d for c in chunks for d in c.delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [("get_weather", arguments_so_far)]
    assert chunks[-1].finish_reason == "length"


@pytest.mark.parametrize("fmt, text, calls", [
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', [("get_weather", '{"city": "Pa')]),
    (HERMES, '<tool_call>\n{"name": "get_wea', [("get_weather", "")]),  # the name completed: one function starts so
    (HERMES, '<tool_call>\n{"na', []),  # no name yet: nothing, and no markup either
    (HERMES, 'Sure.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool', [("get_time", "{}")]),
    (HERMES, '<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>\n<tool_call>\n{"name":"get_weather",'
             '"arguments":{"c', [("get_time", "{}"), ("get_weather", '{"c')]),
    (JSON, '{"name": "get_weather", "parameters": {"city": "Os', [("get_weather", '{"city": "Os')]),
])
def test_cut_calls_are_read_as_far_as_they_got(fmt, text, calls):
    parser = CallParser(fmt, ["get_weather", "get_time"])
    shown = parser.feed(text)
    rest, found = parser.finish(cut=True)
    assert rest == "" and "<tool_call>" not in shown and [(c["name"], c["arguments"]) for c in found] == calls


def test_cut_json_that_is_no_call_stays_content():
    parser = CallParser(JSON, ["get_weather"])
    assert parser.feed('{"answer": 4') == "" and parser.finish(cut=True) == ('{"answer": 4', [])


def test_a_forced_call_is_never_content_nor_ended_by_a_stop_string(tools_client):
    """max_tokens 1 leaves "<" of "<tool_call>": not shown; a stop string inside the call's JSON ends
    content only (as OpenAI's), so the call is whole."""
    request = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0)
    one = tools_client.chat.completions.create(max_tokens=1, **request).choices[0]
    assert (one.message.content, one.message.tool_calls, one.finish_reason) == ("", None, "length")
    whole = tools_client.chat.completions.create(max_tokens=60, **request).choices[0]
    stopped = tools_client.chat.completions.create(max_tokens=60, stop=["city", "\n"], **request).choices[0]
    assert stopped.finish_reason == "tool_calls"
    assert stopped.message.tool_calls[0].function == whole.message.tool_calls[0].function


def test_parameters_not_an_object_schema_are_a_400(tools_client):
    odd = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\].function.parameters must be a JSON Schema of type 'object'"):
        tools_client.chat.completions.create(model=MODEL, messages=ASK, tools=[odd], tool_choice="required", max_tokens=4)


def test_the_call_grammar_resolves_references_and_closes_objects(llm):
    """pydantic's parameters ($defs, "$ref": "#/$defs/...") embedded in the call's schema still
    resolve; objects that say nothing of other properties take none (llama.cpp's reading)."""
    from llama_lite.engine.constraints import Grammars
    from llama_lite.engine.sampling import SamplingParams

    place = {"$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
             "type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"]}
    grammar = call_grammar(HERMES, [{"name": "locate", "parameters": place}, {"name": "ping"}])
    matcher = Grammars(llm.tokenizer, llm.model.params.vocab_size).matcher

    def accepts(arguments):
        m = matcher(SamplingParams(grammar=grammar))
        text = f'<tool_call>\n{{"name":"locate","arguments":{arguments}}}\n</tool_call>'
        return m.consume_tokens(llm.tokenizer.encode(text, bos=False, eos=False)) and m.is_accepting()

    assert accepts('{"place":{"city":"Oslo"}}')
    assert not accepts('{"place":{"city":"Oslo","country":"NO"}}') and not accepts('{"place":{}}')
