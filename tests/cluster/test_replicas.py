"""serve --ray: two replicas on Ray Serve behind the prefix-affinity router, spoken to with the
official openai client: whole and streamed answers agree, a conversation's second turn reaches the
replica holding its first (cached_tokens > 0), and uniform clients are spread evenly."""

import re
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from llama_lite.cluster.replicas import APP_NAME, REPLICA_HEADER, routing_text
from tests.server.test_server import free_port
from tests.tiny_gguf import write_tiny_gguf

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
MODEL = "tiny"


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from llama_lite.cluster.replicas import start_replicas

    # a tiny model with a long context: a stream of ~2,000 tokens outlasts a client's leaving
    tiny = str(write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context=2048))
    port = free_port()
    build = {"checkpoint": tiny, "dtype": "float32", "device": "cpu", "max_seq_len": None, "max_batch_size": 16, "seed": 0}
    assert start_replicas(2, "127.0.0.1", port, build, 2, MODEL) == 1  # a thread each
    yield f"http://127.0.0.1:{port}"
    serve.delete(APP_NAME)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def test_whole_and_streamed_answers_agree_and_errors_pass_through(server, client):
    messages = [{"role": "user", "content": "the he the"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True) if c.choices]
    assert whole.choices[0].message.content == "".join(pieces) and whole.usage.completion_tokens == 8
    text = client.completions.create(model=MODEL, prompt="the he", max_tokens=4, temperature=0).choices[0].text
    assert isinstance(text, str)
    assert [m.id for m in client.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError, match="does not exist here"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    reply = httpx.post(server + "/v1/completions", content=b"{not json", timeout=30)
    assert reply.status_code == 400 and "error" in reply.json()


def test_second_turns_reach_the_replica_holding_their_first(client):
    systems = [f"{uuid.uuid4().hex} {uuid.uuid4().hex} is assistant {i}." for i in range(12)]

    def turn(messages):
        reply = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        return reply.parse(), reply.headers[REPLICA_HEADER.decode()]

    firsts = [[{"role": "system", "content": s}, {"role": "user", "content": "the he"}] for s in systems]
    with ThreadPoolExecutor(12) as pool:
        first = list(pool.map(turn, firsts))
        seconds = [m + [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "he"}]
                   for m, (r, _) in zip(firsts, first)]
        second = list(pool.map(turn, seconds))
    assert len({replica for _, replica in first}) == 2  # the first turns were spread
    # The whole first prompt is reused (all but its last 2 tokens, engine/prefix_cache.py), not a beginning that
    # every conversation shares (the chat template's), which any replica holds.
    cached = [r.usage.prompt_tokens_details.cached_tokens >= f.usage.prompt_tokens - 2 for (r, _), (f, _) in zip(second, first)]
    same = [a == b for (_, a), (_, b) in zip(first, second)]
    detail = [(r.usage.prompt_tokens_details.cached_tokens, f.usage.prompt_tokens, a, b) for (r, b), (f, a) in zip(second, first)]
    assert sum(cached) >= 11 and sum(same) >= 11, [d for d, c in zip(detail, cached) if not c]


def test_uniform_clients_are_spread_evenly(client):
    def client_run(c):
        replicas = []
        for _ in range(4):
            reply = client.completions.with_raw_response.create(model=MODEL, prompt=f"{uuid.uuid4().hex} the he",
                                                                 max_tokens=16, temperature=0)
            replicas.append(reply.headers[REPLICA_HEADER.decode()])
        return replicas

    with ThreadPoolExecutor(16) as pool:
        counts = Counter(r for replicas in pool.map(client_run, range(16)) for r in replicas)
    # Each request goes to the replica with fewer in flight, so a replica slowed by other work on the cores
    # (the suite's background build) rightly takes fewer (40 / 24 seen in CI); requests routed at once all
    # going one way (ties not broken at random) would leave the other next to none.
    assert len(counts) == 2 and min(counts.values()) >= 0.25 * 64, counts


def test_serve_flags_that_cannot_run_are_one_error_each():
    from llama_lite.cli.serve_command import serve

    with pytest.raises(ValueError, match="--replicas needs --ray"):
        serve(replicas=2)
    with pytest.raises(ValueError, match=r"--port with --ray must be a whole number in 1\.\.65535"):
        serve(ray="local", port=0)
    with pytest.raises(ValueError, match="--replicas must be"):
        serve(ray="local", replicas=0)


def test_routing_text_is_where_a_prompt_begins():
    chat = routing_text(b'{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}')
    longer = routing_text(b'{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, '
                          b'{"role": "assistant", "content": "A"}]}')
    assert longer.startswith(chat) and chat
    assert routing_text(b'{"prompt": "P"}') == "P" and routing_text(b'{"prompt": ["P", "Q"]}') == "P"
    assert routing_text(b"{not json") == "" and routing_text(b"[1]") == ""


def aborted(server) -> "float | None":
    """Requests ended by "abort", summed over both replicas (/metrics answers from either one); None
    while the router sends every request to one (the other still busy with the stream just left)."""
    seen = {}
    deadline = time.time() + 30  # a replica still finishing an earlier test's stream gets no /metrics till then
    while time.time() < deadline:
        reply = httpx.get(server + "/metrics", timeout=30)
        found = re.search(r'^llama_lite_requests_finished_total\{finish_reason="abort"\} ([0-9.e+]+)$', reply.text, re.M)
        seen[reply.headers[REPLICA_HEADER.decode()]] = float(found.group(1)) if found else 0.0
        if len(seen) == 2:
            return sum(seen.values())
        time.sleep(0.05)
    return None


def test_a_client_that_leaves_mid_stream_is_aborted_on_its_replica(server):
    before = aborted(server)
    assert before is not None, "/metrics reached only one replica with both idle"
    # far more tokens than the tiny model writes in the moment a disconnect takes to reach the replica
    body = {"model": MODEL, "prompt": f"{uuid.uuid4().hex} the", "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert any(next(lines).startswith("data: {") for _ in range(3))
    deadline = time.time() + 20
    while aborted(server) != before + 1 and time.time() < deadline:
        time.sleep(0.2)
    assert aborted(server) == before + 1
