"""The OpenAI-compatible server, started for real (uvicorn on a socket on 127.0.0.1) and spoken to
with the official `openai` client and raw HTTP: whole and streamed answers against each other and
against the engine run in-process, concurrent clients against each request alone, dropped clients,
bad requests, the queue limit, SIGTERM, and 500 requests with flat memory. Checks of the app's
plumbing (body limit, failures, where parsing runs) use it in-process through Starlette's TestClient."""

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from llama_lite import SamplingParams
from llama_lite.server.app import create_app
from tests.conftest import ROOT, TESTS

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from starlette.testclient import TestClient  # noqa: E402 (needs httpx)

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags, dtype="float32", max_seq_len=512):
    """A server subprocess (float32, as the `llm` fixture) and its base URL, once /health answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--port", str(port), "--dtype", dtype,
                             "--device", "cpu", "--max_seq_len", str(max_seq_len), "--seed", "0", *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 120 s")


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read().decode(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max_batch_size", 8, "--api_key", KEY)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)


def in_process(llm, requests):
    """(text, ids, finish reason) of each (prompt ids, SamplingParams kwargs), from the engine in this
    process. Run together: tests/engine/test_engine.py shows each request gets, bit for bit, what it gets alone."""
    engine = llm.engine
    rids = [engine.add(prompt_ids, SamplingParams(**params)) for prompt_ids, params in requests]
    results = {rid: [[], [], None] for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            result = results[out.request_id]
            result[0].append(out.text)
            result[1] += out.token_ids
            result[2] = out.finish_reason if out.finished else result[2]
    return [("".join(results[rid][0]), results[rid][1], results[rid][2]) for rid in rids]


def alone(llm, prompt_ids, **params):
    return in_process(llm, [(prompt_ids, params)])[0]


def metric(url, name):
    text = httpx.get(url + "/metrics").text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


# --- answers -------------------------------------------------------------------------------------

def test_completion_whole_streamed_and_alone_agree(llm, client):
    prompt = "The capital of France is"
    ids = llm.tokenizer.encode(prompt, bos=llm.tokenizer.add_bos, eos=False)
    want, want_ids, reason = alone(llm, ids, temperature=0, max_tokens=20)
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
    assert whole.object == "text_completion" and whole.model == MODEL and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (len(ids), 20, len(ids) + 20)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_whole_streamed_and_alone_agree(llm, client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
    want, _, reason = alone(llm, llm.chat_prompt_tokens(messages), temperature=0, max_tokens=32)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want and whole.choices[0].finish_reason == reason
    assert whole.usage.prompt_tokens == len(llm.chat_prompt_tokens(messages))
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == reason


def test_streams_carry_no_empty_chunks(llm, client):
    prompt = "The capital of France is"  # " Paris.\n\nThe answer is: ...": the stop's start is held back, token by token
    ids = llm.tokenizer.encode(prompt, bos=False, eos=False)
    want, _, _ = alone(llm, ids, temperature=0, max_tokens=20, stop=["\n\nThe answer"])
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=["\n\nThe answer"],
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert all(c.choices[0].text for c in chunks[:-1]) and chunks[-1].choices[0].finish_reason == "stop"
    chat = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=20,
                                               temperature=0, stop=["\n\n"], stream=True))
    assert all(c.choices[0].delta.content for c in chat[1:-1])  # the role chunk first, the finish chunk last


def test_logprob_bytes_rebuild_the_text(client):
    messages = [{"role": "user", "content": "Say hello in Japanese."}]  # characters of three bytes, split over tokens
    done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content, text = done.choices[0].logprobs.content, done.choices[0].message.content
    assert b"".join(bytes(c.bytes) for c in content) == text.encode("utf-8")
    partial = [c for c in content if not _is_utf8(bytes(c.bytes))]
    assert partial, "no token held part of a character: the check is void"
    assert all("\ufffd" not in c.token and c.token == bytes(c.bytes).decode("utf-8", "backslashreplace") for c in partial)
    assert all(bytes(t.bytes).decode("utf-8", "backslashreplace") == t.token for c in content for t in c.top_logprobs)
    whole = client.completions.create(model=MODEL, prompt="「こんにちは」は日本語です", max_tokens=1, temperature=0, logprobs=1,
                                      echo=True)  # the echoed prompt's tokens: some hold part of a character
    lp, text = whole.choices[0].logprobs, whole.choices[0].text
    assert any(t.startswith("bytes:\\x") for t in lp.tokens)  # as OpenAI's legacy completions show them
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert token.startswith("bytes:") or text[offset : offset + len(token)] == token


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_logprobs_echo_n_and_stop(llm, client):
    prompt = "Paris is the capital of"
    ids = llm.tokenizer.encode(prompt, bos=False, eos=False)
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True)
    lp = done.choices[0].logprobs
    assert done.choices[0].text.startswith(prompt) and len(lp.tokens) == len(ids) + 6
    assert lp.token_logprobs[0] is None and all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert done.usage.completion_tokens == 6
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(c.token == c.top_logprobs[0].token and c.logprob == c.top_logprobs[0].logprob for c in content)  # greedy
    many = client.completions.create(model=MODEL, prompt=["One, two,", "The sky is"], max_tokens=8, temperature=0.9, seed=5, n=2)
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    want = in_process(llm, [(llm.tokenizer.encode(["One, two,", "The sky is"][i // 2], bos=False, eos=False),
                              dict(temperature=0.9, top_p=1.0, max_tokens=8, seed=5 + i)) for i in range(4)])
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == [w[0] for w in want]  # choice k: seed + k
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=20, temperature=0).choices[0].text
    stop = text[text.index(".") - 2 : text.index(".") + 2]  # spans tokens
    cut = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_32_concurrent_clients_each_get_what_they_get_alone(llm, client):
    prompts = [f"Write a sentence about the number {i}." for i in range(32)]

    def kwargs(i):
        kind = i % 4
        if kind == 0:
            return dict(temperature=0, max_tokens=8 + i % 7)
        if kind == 1:
            return dict(temperature=0.8, top_p=0.9, seed=i, max_tokens=12)
        if kind == 2:
            return dict(temperature=1.0, seed=100 + i, max_tokens=10, extra_body={"top_k": 20})
        return dict(temperature=0, max_tokens=16, stop=[" the", ","])

    def ask(i):
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            reply = client.chat.completions.create(model=MODEL, messages=messages, **kwargs(i))
            return reply.choices[0].message.content, reply.choices[0].finish_reason
        chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kwargs(i))
        pieces, reason = [], None
        for c in chunks:
            pieces.append(c.choices[0].delta.content or "")
            reason = c.choices[0].finish_reason or reason
        return "".join(pieces), reason

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(ask, range(32)))
    requests = []
    for i in range(32):
        kw = kwargs(i)
        extra = kw.pop("extra_body", {})
        kw = {"top_p": 1.0, **kw, **extra}  # the server's default top_p is OpenAI's, 1
        requests.append((llm.chat_prompt_tokens([{"role": "user", "content": prompts[i]}]), kw))
    want = [(text, reason) for text, _, reason in in_process(llm, requests)]
    assert got == want


def test_a_repeated_prompt_reuses_its_kv_only_under_its_salt(llm, server, client):
    """The same prompt again, then a chat's next turn: usage.prompt_tokens_details.cached_tokens shows
    what the prefix cache gave (all but two tokens; the whole last prompt), only under the same
    cache_salt, and the answers are what the engine gives in-process; `n` copies prefill their prompt
    once; /metrics counts hits, misses and reused tokens."""
    salt = uuid.uuid4().hex
    prompt = "Tell me about the history of Rome, from its founding to the fall of the Western Empire."
    ids = llm.tokenizer.encode(prompt, bos=llm.tokenizer.add_bos, eos=False)
    want = alone(llm, ids, temperature=0, max_tokens=8)[0]
    names = [f"llama_lite_prefix_cache_{name}_total" for name in ("hits", "misses", "reused_tokens")]
    before = [metric(server, name) for name in names]

    def ask(salt, **extra):
        done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body={"cache_salt": salt},
                                         **extra)
        return [c.text for c in done.choices], done.usage.prompt_tokens_details.cached_tokens

    assert [ask(s) for s in (salt, salt, salt + "-other")] == [([want], 0), ([want], len(ids) - 2), ([want], 0)]
    assert [metric(server, name) - b for name, b in zip(names, before)] == [1, 2, len(ids) - 2]
    texts, cached = ask(salt + "-n", n=3)
    assert cached == 0 and texts == [want] * 3
    assert metric(server, names[0]) - before[0] == 3  # the second and third choice reused the first's prompt
    dialog = [{"role": "user", "content": "Name a fruit."}]
    first = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=8, temperature=0,
                                           extra_body={"cache_salt": salt})
    dialog += [{"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And a vegetable?"}]
    second = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=8, temperature=0,
                                            extra_body={"cache_salt": salt})
    assert (second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
            == len(llm.chat_prompt_tokens(dialog[:1])))
    assert second.choices[0].message.content == alone(llm, llm.chat_prompt_tokens(dialog), temperature=0, max_tokens=8)[0]


# --- structured output and tool calls ------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_response_format_json_schema_and_json_object(llm, client):
    """Sampled at temperature 1: every reply validates, equals the same constrained request run in
    process, and streams to the same text; the openai client's parse() reads its pydantic model."""
    jsonschema = pytest.importorskip("jsonschema")
    pydantic = pytest.importorskip("pydantic")
    messages = [{"role": "user", "content": "Invent a person."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    prompt = llm.chat_prompt_tokens(messages)
    for seed in (0, 1):
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, seed=seed, response_format=fmt)
        text = whole.choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
        assert (text, whole.choices[0].finish_reason) == alone(llm, prompt, temperature=1.0, top_p=1.0, max_tokens=60, seed=seed,
                                                               json_schema=PERSON)[::2]
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, seed=1, response_format=fmt,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text

    class Person(pydantic.BaseModel):
        name: str
        age: int

    parsed = client.chat.completions.parse(model=MODEL, messages=messages, max_tokens=60, temperature=0, response_format=Person)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    done = client.completions.create(model=MODEL, prompt="A JSON object:", max_tokens=48, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}})  # not in the client's signature
    want, _, reason = alone(llm, llm.tokenizer.encode("A JSON object:", bos=False, eos=False), temperature=0, max_tokens=48,
                            json_object=True)
    assert done.choices[0].text == want and done.choices[0].finish_reason == reason
    if reason == "stop":
        assert isinstance(json.loads(want), dict)


TEMPLATES = TESTS / "templates"
CITY_CALLS = [{"role": "user", "content": f"Weather in {city}?"} if i % 2 == 0 else
              {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{city}", "type": "function", "function": {
                  "name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}]}
              for city in ("Paris", "Rome", "Oslo", "Lima") for i in range(2)]


@pytest.fixture(scope="module")
def tools_client():
    """SmolLM2 served with a ChatML template of ours that takes tools (Hermes / Qwen2.5 format)."""
    proc, url = start_server("--max_batch_size", 4, "--chat_template", TEMPLATES / "chatml_tools.jinja", max_seq_len=1024)
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    stop_server(proc)


def hermes_reply(llm, messages, tools, **params):
    """(text, finish reason) of the chat rendered with tests/templates/chatml_tools.jinja, in process."""
    from llama_lite.text.chat_template import render_chat

    dialog = [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]
    text = render_chat((TEMPLATES / "chatml_tools.jinja").read_text(), dialog, tools=tools)
    reply, _, reason = alone(llm, llm.tokenizer.encode(text, bos=False, eos=False), top_p=1.0, **params)
    return reply, reason


def test_tool_calls_required_named_auto_and_none(llm, tools_client):
    """SmolLM2 with a Hermes-format template: "required" and a named function give a call whose
    arguments validate (the text the constrained request writes in process); streamed, the call comes
    as deltas; "auto" finds the call the model writes after four examples, and plain text stays
    content; "none" leaves the tools out."""
    from llama_lite.server.tool_calls import call_grammar

    jsonschema = pytest.importorskip("jsonschema")
    clock = {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    reply = tools_client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, clock], tool_choice="required",
                                                 max_tokens=80, temperature=0)
    choice = reply.choices[0]
    [call] = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls" and choice.message.content is None and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    called = {WEATHER["function"]["name"]: WEATHER, "get_time": clock}[call.function.name]
    jsonschema.validate(arguments, called["function"]["parameters"])
    grammar = call_grammar("hermes", [WEATHER["function"], clock["function"]])
    text, reason = hermes_reply(llm, ask, [WEATHER, clock], temperature=0, max_tokens=80, grammar=grammar)
    assert reason == "stop" and json.loads(text[len("<tool_call>"):-len("</tool_call>")]) == {"name": call.function.name,
                                                                                            "arguments": arguments}
    streamed = list(tools_client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, clock],
                                                         tool_choice="required", max_tokens=80, temperature=0, stream=True))
    deltas = [d for c in streamed for d in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [(call.function.name, arguments)]
    assert streamed[-1].choices[0].finish_reason == "tool_calls"

    named = tools_client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, clock], max_tokens=40, temperature=0,
                                                 tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = named.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")

    berlin = CITY_CALLS + [{"role": "user", "content": "Weather in Berlin?"}]
    auto = tools_client.chat.completions.create(model=MODEL, messages=berlin, tools=[WEATHER], max_tokens=40, temperature=0)
    [call] = auto.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)["city"]) == ("get_weather", "Berlin")
    assert auto.choices[0].finish_reason == "tool_calls"
    joke = [{"role": "user", "content": "Tell me a joke."}]
    plain = tools_client.chat.completions.create(model=MODEL, messages=joke, tools=[WEATHER], max_tokens=24, temperature=0)
    assert plain.choices[0].message.tool_calls is None
    assert (plain.choices[0].message.content, plain.choices[0].finish_reason) == hermes_reply(llm, joke, [WEATHER], temperature=0,
                                                                                              max_tokens=24)
    none = tools_client.chat.completions.create(model=MODEL, messages=joke, tools=[WEATHER], tool_choice="none", max_tokens=24,
                                                temperature=0)
    assert none.choices[0].message.content == hermes_reply(llm, joke, None, temperature=0, max_tokens=24)[0]
    unique = {"type": "function", "function": {"name": "pick", "parameters": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError,
                       match=r'tools\[0\].function.parameters cannot be enforced: Unimplemented keys: \["uniqueItems"\]'):
        tools_client.chat.completions.create(model=MODEL, messages=joke, tools=[unique], tool_choice="required", max_tokens=4)


def test_llama31_json_tool_calls_from_the_checkpoints_own_template(tmp_path):
    """A tiny random Llama 3.1 (transformers-made, RoPE scaled), its tokenizer_config's template in
    Llama 3.1's custom-tool format: "required" and a named function give a call in its JSON format,
    arguments valid, returned as tool_calls; a template without tools refuses them."""
    from tests.loading.test_families import FAMILIES, hf_model, save_hf

    jsonschema = pytest.importorskip("jsonschema")
    folder = save_hf(hf_model("llama3", max_position_embeddings=2048), "llama3", tmp_path / "tiny-llama31")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (TEMPLATES / "llama31_tools.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    proc, url = start_server("--checkpoint", folder, max_seq_len=2048)  # byte-level tokens: the tools take ~1000
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            reply = client.chat.completions.create(model="tiny-llama31", messages=ask, tools=[WEATHER], tool_choice=choice,
                                                   max_tokens=400, temperature=1.0, seed=3)  # a token a byte
            assert reply.choices[0].finish_reason == "tool_calls", reply.choices[0]
            [call] = reply.choices[0].message.tool_calls
            assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        plain = client.chat.completions.create(model="tiny-llama31", messages=ask, tools=[WEATHER], max_tokens=4)
        assert plain.choices[0].message.tool_calls is None  # random weights write no call
    finally:
        stop_server(proc)
    assert "tools" not in FAMILIES["llama3"]["template"]  # the family's plain template (test_families) takes none


def test_a_repeating_reply_is_guessed_and_metrics_count_it(llm, server, client):
    """A prompt whose continuation repeats it: the server (speculation "auto", float32) answers what an
    engine without speculation gives, and /metrics counts the guessed and accepted tokens."""
    from llama_lite.engine.engine import Engine

    prompt = "one two three four five six seven, one two three four five six seven, one two three four five six seven, one"
    ids = llm.tokenizer.encode(prompt, bos=llm.tokenizer.add_bos, eos=False)
    off = Engine(llm.model, llm.tokenizer, llm.generator, speculative="off")
    off.add(ids, SamplingParams(temperature=0, max_tokens=24))
    want = ""
    while off.has_unfinished():
        want += "".join(out.text for out in off.step())
    names = [f"llama_lite_speculative_{name}_total" for name in ("proposed_tokens", "accepted_tokens", "steps")]
    before = [metric(server, name) for name in names]
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text == want
    proposed, accepted, steps = (metric(server, name) - b for name, b in zip(names, before))
    assert proposed >= accepted > 0 and steps > 0


# --- the service ---------------------------------------------------------------------------------

def test_models_health_metrics_and_auth(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.models.retrieve("gpt-4")
    assert httpx.get(server + "/health").json() == {"status": "ok", "decode_step": "eager", "path": "float32",
                                                    "why": "asked for (dtype='float32')"}  # float32: eager, nothing measured
    text = httpx.get(server + "/metrics").text
    for name in ("llama_lite_requests_running", "llama_lite_requests_waiting", "llama_lite_kv_cache_rows_in_use",
                 "llama_lite_prompt_tokens_total", "llama_lite_generation_tokens_total",
                 "llama_lite_time_to_first_token_seconds_bucket", "llama_lite_inter_token_latency_seconds_bucket",
                 "llama_lite_prefix_cache_hits_total", "llama_lite_prefix_cache_misses_total",
                 "llama_lite_prefix_cache_reused_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
        assert name in text, name
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        reply = httpx.post(server + "/v1/completions", json=body, headers=headers)
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"


def test_a_client_dropped_mid_stream_frees_its_row(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
    before = metric(server, 'llama_lite_requests_finished_total{finish_reason="abort"}') or 0
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=HEADERS, timeout=60) as reply:
        lines = reply.iter_lines()
        seen = [next(lines) for _ in range(4)]
        assert any(line.startswith("data: {") for line in seen)
        assert metric(server, "llama_lite_kv_cache_rows_in_use") == 1
        # vLLM's gauges, which Kubernetes LLM gateways read, say the same: one of 8 rows running
        assert metric(server, "vllm:num_requests_running") == 1 and metric(server, "vllm:gpu_cache_usage_perc") == 1 / 8
        assert metric(server, "vllm:num_requests_waiting") == 0
    deadline = time.time() + 10
    while metric(server, "llama_lite_kv_cache_rows_in_use") != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(server, "llama_lite_kv_cache_rows_in_use") == 0
    assert metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:kv_cache_usage_perc") == 0
    assert metric(server, 'llama_lite_requests_finished_total{finish_reason="abort"}') == before + 1


def test_a_client_that_leaves_a_whole_answer_frees_its_row(server):
    """Not streamed: nothing is written until the end, so the server must notice the disconnect itself
    (the openai client's timeouts and retries left abandoned requests on rows)."""
    before = metric(server, 'llama_lite_requests_finished_total{finish_reason="abort"}') or 0
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.time() + 30
        while metric(server, "llama_lite_kv_cache_rows_in_use") != 1:
            assert time.time() < deadline
            time.sleep(0.05)
    deadline = time.time() + 10  # 400 tokens would take ~20 s here
    while metric(server, "llama_lite_kv_cache_rows_in_use") != 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(server, "llama_lite_kv_cache_rows_in_use") == 0
    assert metric(server, 'llama_lite_requests_finished_total{finish_reason="abort"}') == before + 1


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b'{"model": "' + MODEL.encode() + b'", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", 400,
     "could not be parsed"),
    ("/v1/completions", b"[" * 100000, 400, "could not be parsed"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object"),
    ("/v1/completions", {"prompt": "hi"}, 400, "'model' is required"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 400, "model 'gpt-4' does not exist here"),
    ("/v1/completions", {"model": MODEL}, 400, "'prompt' is required"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "'prompt' is required"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt 0 is empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "10"}, 400, "'max_tokens' must be a whole number"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be a whole number"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "'temperature' must be a number in [0, 2]"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "'top_p' must be a number in [0, 1]"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, 400, "'n' must be a whole number in 1..16"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 6}, 400, "'logprobs' must be a whole number in 0..5"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 1.5}, 400, "'seed' must be a whole number"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "only with stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 10}}, 400, "'logit_bias' is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "'best_of' is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frobnicate": 1}, 400, "unrecognized request argument 'frobnicate'"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "cache_salt": 5}, 400, "'cache_salt' must be a non-empty string"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 600}, 400, "this model's context is 512 tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400, "this model's context is 512 tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": ["hi"] * 5, "n": 16}, 400,
     "80 sequences (prompts x n), more than the server ever holds (8 rows + --max_queue 64)"),
    ("/v1/completions", {"model": MODEL, "prompt": ["hi"] * 80}, 400, "more than the server ever holds"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 9000}, 400, "more tokens than this model's context holds"),
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}, 400, "prompt 0: the text holds '\\ud800' at 1, a lone surrogate"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text parts"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\ud800b"}]}, 400,
     "messages[0].content holds '\\ud800' at 1, a lone surrogate"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400,
     "the messages hold more tokens than this model's context"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "'tools[0].function' is required"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
      "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 400,
     "tools[0].function.parameters must be a JSON Schema of type 'object'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice needs 'tools'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, 400,
     "tool_choice names function 'get_time', which is not among the tools (get_weather)"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                              "response_format": {"type": "json_object"}}, 400,
     "response_format and tools cannot be used together"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, 400,
     "arguments of 'f' are not valid JSON"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "tools": [WEATHER]}, 400, "'tools' is not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "xml"}}, 400, "'response_format.type'"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema"}}, 400,
     "response_format of type 'json_schema' needs a 'json_schema'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, 400,
     'response_format.json_schema.schema cannot be enforced: Unimplemented keys: ["uniqueItems"]'),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400,
     "top_logprobs needs logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "'top_logprobs' must be a whole number in 0..20"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "echo": True}, 400,
     "unrecognized request argument 'echo'"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error(server, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(server + path, content=content, headers={**HEADERS, "Content-Type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
    assert message in error["message"], error["message"]


def test_a_failure_inside_is_a_json_500_without_its_traceback(llm, monkeypatch, caplog):
    def broken(dialog, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(llm, "chat_prompt_tokens", broken)
    with TestClient(create_app(llm, MODEL)) as http, caplog.at_level(logging.ERROR, logger="llama_lite.server"):
        reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
    assert "secret internals" not in reply.text and "Traceback" not in reply.text
    assert "secret internals" in caplog.text  # the log has it


def test_large_bodies_are_413_before_parsing_and_prompts_are_tokenized_off_the_event_loop(llm, monkeypatch):
    seen = []
    encode = llm.tokenizer.encode

    def watched(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            seen.append("event loop")
        except RuntimeError:
            seen.append("worker thread")
        return encode(*args, **kwargs)

    monkeypatch.setattr(llm.tokenizer, "encode", watched)
    monkeypatch.setattr("llama_lite.server.protocol.json.loads", _refuse_big(json.loads))
    with TestClient(create_app(llm, MODEL, max_queue=0, max_body_mb=0.01)) as http:  # 10 KiB
        big = {"model": MODEL, "prompt": "word " * 4000, "max_tokens": 1}
        chunks = [json.dumps(big).encode()[i : i + 1000] for i in range(0, 20000, 1000)]
        for reply in (http.post("/v1/completions", json=big),  # with a Content-Length
                      http.post("/v1/completions", content=iter(chunks))):  # chunked
            assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1}).status_code == 200
        assert seen == ["worker thread"]
        nine = http.post("/v1/completions", json={"model": MODEL, "prompt": ["Hi"] * 9, "max_tokens": 1})
        assert nine.status_code == 400 and "(8 rows + --max_queue 0)" in nine.json()["error"]["message"]  # never, not 429
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def _refuse_big(loads):
    def checked(raw, *args, **kwargs):
        assert len(raw) < 10 * 1024 + 1, "a body over the limit was parsed"
        return loads(raw, *args, **kwargs)

    return checked


def test_allowed_defaults_of_unsupported_fields_pass(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "logit_bias": {}, "best_of": 1, "suffix": None, "user": "me"}
    assert httpx.post(server + "/v1/completions", json=body, headers=HEADERS).status_code == 200


def test_health_says_compiling_while_another_process_builds_the_step(llm, monkeypatch):
    """A first start decodes eagerly while its child builds the compiled step: /health says so (a
    benchmark or a load balancer waits for "compiled"), and "compiled" once it is taken."""

    from llama_lite.model.aot_step import EagerStep

    class Built:
        ready, error, compiled = True, None, True

    monkeypatch.setattr(llm.model, "compiled_later", lambda: None)
    monkeypatch.setattr(llm.model, "decode_step", EagerStep(llm.model))
    with TestClient(create_app(llm, MODEL)) as http:
        assert http.get("/health").json()["decode_step"] == "compiling"
        monkeypatch.setattr(llm.model, "compiled_later", None)
        monkeypatch.setattr(llm.model, "decode_step", Built())
        assert http.get("/health").json()["decode_step"] == "compiled"


# --- limits and shutdown, on a server of one row -------------------------------------------------

def test_a_full_queue_is_429_and_sigterm_ends_running_requests():
    proc, url = start_server("--max_batch_size", 1, "--max_queue", 0)
    try:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as reply:
            lines = reply.iter_lines()
            next(lines)
            busy = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "2"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_idle_server_stops_when_sigterm_reaches_another_thread():
    """The kernel may hand a process's signal to any of its threads; Python runs the handler in the
    main thread, which an idle server spends waiting for work: it must still stop at once."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("no tgkill in this C library")
    proc, url = start_server("--max_batch_size", 1, max_seq_len=128)
    try:
        assert httpx.get(url + "/health").json()["status"] == "ok"
        time.sleep(0.5)  # the engine's thread is waiting for work
        other = next(int(tid) for tid in sorted(os.listdir(f"/proc/{proc.pid}/task")) if int(tid) != proc.pid)
        assert libc.tgkill(proc.pid, other, signal.SIGTERM) == 0, ctypes.get_errno()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_port_0_prints_the_port_it_took_and_ctrl_c_exits_0():
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--port", "0", "--dtype", "float32",
                             "--device", "cpu", "--max_seq_len", "128", "--max_batch_size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line, "the server exited before serving"
        url = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert url and url.group(1) != "0", line
        base = f"http://127.0.0.1:{url.group(1)}"
        deadline = time.time() + 60
        while True:
            try:
                assert httpx.get(base + "/health", timeout=1).json()["status"] == "ok"
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: running requests end, then a clean exit
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_busy_port_is_one_error_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--port", str(port)], capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr


# --- many clients, memory flat --------------------------------------------------------------------

def rss_mb(pid) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.slow
def test_500_requests_from_16_clients_none_lost_or_duplicated_and_memory_flat(llm):
    proc, url = start_server("--max_batch_size", 8, "--nocompile", dtype="bfloat16")  # exactness is not the point here: speed is
    try:
        samples, done = [], threading.Event()

        def sample_rss():
            while not done.is_set():
                samples.append(rss_mb(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_rss)
        sampler.start()
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        prompts = [f"Item {i}: " + "x" * (i % 9) for i in range(500)]
        lengths = [len(llm.tokenizer.encode(p, bos=False, eos=False)) for p in prompts]

        def ask(i):
            if i % 3 == 0:
                chunks = list(client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=2, temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
                return chunks[-1].id, chunks[-1].usage.prompt_tokens, "".join(c.choices[0].text for c in chunks if c.choices)
            reply = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=2, temperature=0)
            return reply.id, reply.usage.prompt_tokens, reply.choices[0].text

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, range(500)))
        done.set()
        sampler.join()
        assert len({r[0] for r in results}) == 500  # one answer per request, none twice
        assert [r[1] for r in results] == lengths  # each answer is to its own prompt
        assert all(isinstance(r[2], str) for r in results)
        first, second = max(samples[: len(samples) // 2]), max(samples[len(samples) // 2 :])
        print(f"server RSS: first-half peak {first:.0f} MB, second-half peak {second:.0f} MB, {len(samples)} samples")
        assert second - first < 20
    finally:
        stop_server(proc)
