"""Tools on the default model, whose chat template takes none: llama-server's "generic" format (the
tools in the system message, the reply held to JSON that is a call or an answer), through the
server with the official openai client."""

import json

import pytest

from llama_lite.server.generic_tools import GenericParser, generic_dialog
from tests.server.test_server import MODEL, WEATHER, start_server, stop_server

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

PING = {"type": "function", "function": {"name": "ping", "description": "Check that the network is up"}}
ASK = [{"role": "user", "content": "What is the weather like in Paris?"}]
CHOICES = ["auto", "required", {"type": "function", "function": {"name": "ping"}}]


@pytest.fixture(scope="module")
def generic_client():
    """SmolLM2 served with its own template (no tools in it)."""
    proc, url = start_server("--max_batch_size", 4, max_seq_len=2048)
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    stop_server(proc)


def reply_of(client, stream=False, **request):
    """(content, [(name, arguments)], finish reason) of one choice, whole or joined from its chunks."""
    request = {"model": MODEL, "messages": ASK, "tools": [WEATHER, PING], "max_tokens": 60, **request}
    if not stream:
        choice = client.chat.completions.create(**request).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **request) if c.choices]
    content = "".join(c.delta.content or "" for c in chunks)
    calls = [(d.function.name, d.function.arguments) for c in chunks for d in c.delta.tool_calls or []]
    return content or (None if calls else ""), calls, chunks[-1].finish_reason


@pytest.mark.parametrize("tool_choice", CHOICES, ids=["auto", "required", "named"])
def test_each_tool_choice_gives_a_valid_call_and_streams_the_same(generic_client, tool_choice):
    got = reply_of(generic_client, tool_choice=tool_choice, temperature=0)
    content, calls, finish = got
    assert finish == "tool_calls" and content is None and len(calls) == 1
    name, arguments = calls[0]
    schema = {"get_weather": WEATHER["function"]["parameters"], "ping": {"type": "object", "maxProperties": 0}}[name]
    jsonschema.validate(json.loads(arguments), schema)
    if isinstance(tool_choice, dict):
        assert calls == [("ping", "{}")]
    assert reply_of(generic_client, stream=True, tool_choice=tool_choice, temperature=0) == got


def test_auto_may_answer_in_text_and_streams_it_the_same(generic_client):
    """Sampled, "auto" answers in text for some seeds: that text is the content (decoded from the
    reply's JSON string), streamed piece by piece to the same whole."""
    hello = [{"role": "user", "content": "Hi! Just say hello back, please."}]
    for seed in range(12):
        got = reply_of(generic_client, messages=hello, temperature=1.0, seed=seed)
        if not got[1]:
            break
    content, calls, finish = got
    assert calls == [] and finish in ("stop", "length") and isinstance(content, str) and not content.startswith("{")
    assert reply_of(generic_client, stream=True, messages=hello, temperature=1.0, seed=seed) == got


def test_none_leaves_the_tools_out(generic_client):
    none = reply_of(generic_client, tool_choice="none", temperature=0, max_tokens=20)
    assert none == reply_of(generic_client, tools=openai.NOT_GIVEN, temperature=0, max_tokens=20)


def test_a_conversation_with_calls_and_results_goes_on(generic_client):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]
    content, calls, finish = reply_of(generic_client, messages=history, tool_choice="required", temperature=0)
    assert finish == "tool_calls" and calls[0][0] in ("get_weather", "ping")


def test_the_system_message_holds_the_tools_after_the_users_own():
    dialog = generic_dialog([{"role": "system", "content": "Be brief."}, *ASK], [WEATHER], answer=True)
    assert [m["role"] for m in dialog] == ["system", "user"] and dialog[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "get_weather"' in dialog[0]["content"] and '{"response":' in dialog[0]["content"]
    forced = generic_dialog(ASK, [WEATHER], answer=False)
    assert forced[0]["role"] == "system" and '{"response":' not in forced[0]["content"]


@pytest.mark.parametrize("answer", ["plain", 'quote " and \\ slash', "tab\tnew\nline", "snow ☃ and 🎉 emoji", ""])
def test_an_answer_streamed_a_character_at_a_time_is_the_whole_answer(answer):
    text = json.dumps({"response": answer}, ensure_ascii=True)  # \\u escapes, surrogate pairs too
    parser = GenericParser(["get_weather"])
    shown = "".join(parser.feed(c) for c in text)
    rest, calls = parser.finish()
    assert shown + rest == answer and calls == []


def test_pydantic_parameters_with_references_give_a_valid_call(generic_client):
    """The shape langchain and openai-agents send for a pydantic model argument: $defs and $ref."""
    place = {"$defs": {"Place": {"type": "object", "title": "Place", "properties": {"city": {"type": "string"},
                                                                                  "country": {"type": "string"}},
                                 "required": ["city", "country"]}},
             "type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"]}
    locate = {"type": "function", "function": {"name": "locate", "description": "Find a place", "parameters": place}}
    content, calls, finish = reply_of(generic_client, tools=[locate], tool_choice="required", temperature=0)
    assert finish == "tool_calls" and calls[0][0] == "locate"
    closed_place = {**place, "$defs": {"Place": {**place["$defs"]["Place"], "additionalProperties": False}},
                    "additionalProperties": False}
    jsonschema.validate(json.loads(calls[0][1]), closed_place)  # no made-up properties either


def test_a_cut_reply_shows_no_json(generic_client):
    for max_tokens in (1, 3, 9):
        got = reply_of(generic_client, tool_choice="required", temperature=0, max_tokens=max_tokens)
        assert got[0] in (None, "") and got[2] == "length" and all(name in ("get_weather", "ping") for name, _ in got[1])
        assert reply_of(generic_client, stream=True, tool_choice="required", temperature=0, max_tokens=max_tokens) == got
