"""Prefix caching: a request reuses the K/V of its prompt's beginning that a KV-cache row still holds,
and gets bit for bit what it gets with the cache off (float32, greedy and seeded sampling).

The real model runs requests sharing beginnings of many lengths, a multi-turn chat, `n` copies of a
prompt, salts and aborts against an engine with the cache off over the same weights; a scripted model
shows the bookkeeping exactly (which row, what is reused, what is copied, what is evicted); the radix
tree is checked against a brute-force common prefix.
"""

import random

import pytest
import torch

from llama_lite import Llama, SamplingParams
from llama_lite.engine.engine import Engine
from llama_lite.engine.prefix_cache import PrefixTree
from llama_lite.model.kv_cache import KEY_BLOCK
from tests.engine.test_engine import PieceTokenizer, ScriptedModel, corpus_prompts, greedy, mixed_params


def engines(llm, max_step_tokens=512):
    """Two engines over the real model's weights and KV cache: the prefix cache on, and off. (Each
    sees the other's writes and forgets what its rows held: only the rows' K/V are shared.)"""
    return [Engine(llm.model, llm.tokenizer, llm.generator, max_step_tokens, prefix_cache=on) for on in (True, False)]


def run(engine, schedule):
    """Each (step, prompt, params) of `schedule` added at that step (in the schedule's order within
    a step), the engine stepped until all finish: per request (ids, text, reason, logprobs, top
    logprobs) and the cached tokens its outputs reported, in the schedule's order."""
    order = sorted(range(len(schedule)), key=lambda i: schedule[i][0])
    results, cached, rid_of, step = {}, {}, {}, 0
    while order or engine.has_unfinished():
        while order and schedule[order[0]][0] <= step:
            i = order.pop(0)
            rid_of[i] = engine.add(schedule[i][1], schedule[i][2])
            results[rid_of[i]] = [[], [], None, [], []]
        for out in engine.step():
            r = results[out.request_id]
            r[0] += out.token_ids
            r[1].append(out.text)
            r[2] = out.finish_reason if out.finished else r[2]
            r[3] += out.logprobs or []
            r[4] += out.top_logprobs or []
            cached[out.request_id] = out.cached_tokens
        step += 1
    got = [results[rid_of[i]] for i in range(len(schedule))]
    return ([(ids, "".join(text), reason, lps, tops) for ids, text, reason, lps, tops in got],
            [cached[rid_of[i]] for i in range(len(schedule))])


# --- the premise: reused K/V are exactly what a prefill writes ------------------------------------

@torch.inference_mode()
def test_a_positions_kv_depends_only_on_the_tokens_up_to_it_however_prefilled(llm):
    """A prompt's first 150 positions (past a KEY_BLOCK, mid-block) prefilled whole in one row, and as
    the start of another prompt in chunks of 70, 80, 100 beside another segment in another row: the
    same K/V bit for bit, in every layer; and copy_prefix moves exactly those positions."""
    a, b = corpus_prompts(llm.tokenizer, [300, 100], seed=5)
    other = a[:150] + b
    model, cache = llm.model, llm.model.cache
    model.forward_segments(torch.tensor(a), [(0, 0, 300)], torch.tensor([299]))
    model.forward_segments(torch.tensor(other[:70] + b[:5]), [(1, 0, 70), (2, 0, 5)], torch.tensor([69]))
    model.forward_segments(torch.tensor(other[70:150]), [(1, 70, 80)], torch.tensor([79]))
    model.forward_segments(torch.tensor(other[150:]), [(1, 150, 100)], torch.tensor([99]))
    assert 150 > KEY_BLOCK and 150 % KEY_BLOCK
    for kv in (*cache.k, *cache.v):  # each layer's (rows, n_kv_heads, positions, head_dim)
        assert torch.equal(kv[0, :, :150], kv[1, :, :150])
        assert not torch.equal(kv[0, :, 150:151], kv[1, :, 150:151])  # the prompts differ from here on
    cache.copy_prefix(0, 3, 150)
    for kv in (*cache.k, *cache.v):
        assert torch.equal(kv[3, :, :150], kv[0, :, :150])
        assert not torch.equal(kv[3, :, 150:151], kv[0, :, 150:151])  # nothing past them


# --- many requests, cache on against off ------------------------------------------------------------

def test_44_requests_sharing_beginnings_get_what_they_get_with_the_cache_off(llm):
    """44 requests over 8 rows, arriving at different steps: prompts that share 1 token, 2, a mid-block
    37, 128, 129, 150 and 260 (longer than the step budget of 96, so prefilled in chunks) with other
    requests' prompts, whole repeats, extensions; greedy and seeded sampling, stop strings, penalties,
    logprobs and echo (with logprobs: reuses nothing). Every request's ids, text, finish reason and
    logprobs equal the cache-off run's, bit for bit, while over a third of the prompt tokens came from
    the cache (7 families of prompts and their variants over 8 rows: rows are evicted and reused)."""
    rng = random.Random(23)
    bases = corpus_prompts(llm.tokenizer, [1, 2, 37, 128, 129, 150, 260], seed=11)
    tails = corpus_prompts(llm.tokenizer, [40] * 44, seed=12)
    schedule = []
    for i in range(44):
        base = bases[i % len(bases)]
        tail = tails[i][: rng.choice([0, 0, 1, 2, 3, rng.randint(4, 40)])]
        if i % 11 == 5:  # shares only a beginning of the base
            base = base[: max(1, len(base) // 3)]
        params = mixed_params(i, rng)
        if i % 13 == 7:
            params = SamplingParams(temperature=0, max_tokens=3, logprobs=True, top_logprobs=2, echo=True)
        schedule.append((rng.randint(0, 40), base + tail, params))
    on, off = engines(llm, max_step_tokens=96)
    with_cache, cached = run(on, schedule)
    without, none_cached = run(off, schedule)
    for i, (a, b) in enumerate(zip(with_cache, without)):
        assert a == b, (i, len(schedule[i][1]), cached[i], schedule[i][2])
    assert not any(none_cached)
    prompt_tokens = sum(len(p) for _, p, _ in schedule)
    assert on.prefix.reused_tokens == sum(cached) > prompt_tokens // 3  # (the rest: first of their kind, or evicted)
    assert all(cached[i] == 0 for i in range(44) if i % 13 == 7)  # echo with logprobs scores every prompt token
    assert all(c <= max(0, len(schedule[i][1]) - 2) for i, c in enumerate(cached))
    assert {r[2] for r in with_cache} == {"stop", "length"}
    assert len({len(p) for _, p, _ in schedule if len(p) > 96}) > 3  # longer than a step's budget


def test_a_multi_turn_chat_reuses_its_history_and_changes_no_bit(llm):
    """Four turns of a chat, each sending the whole history back (with the replies, whose K/V were
    computed as decoding): with the cache each turn reuses the last turn's prompt and prefills only
    the last reply and the new message; tokens and logprobs equal the cache-off run's, greedy and
    seeded. (Reusing the replies' decoded K/V would change the logits in their last bits.)"""
    cold = Llama(llm.model, llm.tokenizer, llm.generator, prefix_cache=False)
    questions = ["Hi! Who are you?", "What is the tallest mountain?", "How tall is it?", "Thank you. Summarise our chat."]
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=3)):
        replies, reused, lengths = {}, [], []
        for name, model in (("warm", llm), ("cold", cold)):
            dialog = [{"role": "system", "content": "You are a geography teacher."}]
            replies[name] = []
            for question in questions:
                dialog.append({"role": "user", "content": question})
                before = model.engine.prefix.reused_tokens if model.engine.prefix else 0
                [done] = model.chat_completion([dialog], max_gen_len=16, logprobs=True, **kw)
                if model.engine.prefix:
                    reused.append(model.engine.prefix.reused_tokens - before)
                    lengths.append(len(model.chat_prompt_tokens(dialog)))
                dialog.append(done["generation"])
                replies[name].append((done["generation"]["content"], done["logprobs"]))
        assert replies["warm"] == replies["cold"]
        print(kw, "prompt lengths", lengths, "reused", reused)
        assert all(lengths[k - 1] - 2 <= reused[k] <= lengths[k - 1] for k in range(1, len(questions)))  # the last prompt


def test_n_copies_of_a_prompt_prefill_it_once(llm, monkeypatch):
    """Four requests with one prompt, added together: the first prefills it, the others wait a step
    and copy all but its last two positions; each gets what the cache-off engine gives."""
    [prompt] = corpus_prompts(llm.tokenizer, [90], seed=2)
    schedule = [(0, prompt, SamplingParams(temperature=0.8, seed=j, max_tokens=5, logprobs=True)) for j in range(4)]
    on, off = engines(llm)
    prompt_chunks, schedule_step = [], on._schedule

    def recording_schedule():
        work = schedule_step()
        prompt_chunks.extend(ids for request, ids in work if not request.decoding)
        return work

    monkeypatch.setattr(on, "_schedule", recording_schedule)
    with_cache, cached = run(on, schedule)
    prompt_fed = sum(map(len, prompt_chunks))
    assert cached == [0, 88, 88, 88] and prompt_fed == 90 + 3 * 2
    assert with_cache == run(off, schedule)[0]


def test_requests_with_different_salts_never_share(llm):
    [prompt] = corpus_prompts(llm.tokenizer, [60], seed=4)
    on, off = engines(llm)
    salts = ["tenant-a", "tenant-b", None, "tenant-a", None, "tenant-b"]
    schedule = [(k, prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=True, cache_salt=salt))
                for k, salt in enumerate(salts)]
    results, cached = [], []
    for item in schedule:  # one after another: each finds the earlier ones' rows
        result, [c] = run(on, [item])
        results.append(result[0])
        cached.append(c)
    assert cached == [0, 0, 0, 58, 58, 58]
    assert results == [run(off, [item])[0][0] for item in schedule]
    with pytest.raises(ValueError, match="SamplingParams.cache_salt must be a non-empty string or None"):
        SamplingParams(cache_salt="")


def test_an_abort_during_a_prefix_copy_leaks_nothing(llm, monkeypatch):
    """Ctrl-C inside the copy of a shared beginning aborts the request (its row free, the index
    consistent); an abort after the copy, mid-prefill, too; later requests reuse what the aborted
    one prefilled and get what the cache-off engine gives."""
    base, tail_a, tail_b = corpus_prompts(llm.tokenizer, [120, 3, 80], seed=8)
    assert tail_a[0] != tail_b[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=True)
    warm = Llama(llm.model, llm.tokenizer, llm.generator)
    on, off = warm.engine, engines(llm, max_step_tokens=64)[1]
    on.max_step_tokens = 64
    run(on, [(0, base + tail_a, params)])  # a row holds base + tail_a: a request sharing base copies it

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.model.cache, "copy_prefix", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(warm.stream(base + tail_b, 4, temperature=0))
    monkeypatch.undo()
    assert not on.requests and [o.finish_reason for o in on.step()] == ["abort"]
    assert sorted(on.free_rows) == list(range(8)) and not on.has_unfinished()
    rid = on.add(base + tail_b, params)
    on.step()  # copies 120 positions, prefills 64 of the other 80
    assert (on.requests[rid].cached_tokens, on.requests[rid].n_cached) == (120, 184)
    on.abort(rid)
    on.step()
    assert sorted(on.free_rows) == list(range(8)) and not on.has_unfinished()
    later = [(0, base + tail_b, params), (0, base + tail_b[:40], params)]
    again, cached = run(on, later)
    assert cached == [184, 158] and again == run(off, later)[0]


def test_direct_model_calls_make_the_engine_forget_what_rows_held(llm):
    """generate() and model calls write rows outside the engine: it then reuses nothing it held."""
    [prompt] = corpus_prompts(llm.tokenizer, [40], seed=6)
    on, off = engines(llm)
    item = [(0, prompt, SamplingParams(temperature=0, max_tokens=3))]
    run(on, item)
    llm.model(torch.tensor([prompt[:1] * 40] * 8), 0)  # every row's first 40 positions overwritten
    result, cached = run(on, item)
    assert cached == [0] and result == run(off, item)[0]


# --- the bookkeeping, on a scripted model ------------------------------------------------------------

class ScriptedCache:
    """A stand-in KV cache for the scripted model: copying a prefix copies the row's script."""

    def __init__(self, model):
        self.model, self.writes, self.copies = model, 0, []

    def copy_prefix(self, src_row, dst_row, n):
        self.copies.append((src_row, dst_row, n))
        self.model.row_script[dst_row] = self.model.row_script[src_row]


def scripted(max_batch_size, max_step_tokens=512):
    model = ScriptedModel({k: [9] * 64 for k in range(20, 32)}, max_batch_size)  # every new token is 9
    model.cache = ScriptedCache(model)
    engine = Llama(model, PieceTokenizer(), torch.Generator()).engine
    engine.max_step_tokens = max_step_tokens
    return engine, model


def finish(engine, prompt, params=None):
    """Add a request and step until it ends (others keep running): its new ids and cached tokens."""
    rid, ids, cached = engine.add(prompt, params or greedy(max_tokens=3)), [], None
    while cached is None:
        for out in engine.step():
            if out.request_id == rid:
                ids += out.token_ids
                cached = out.cached_tokens if out.finished else None
    return ids, cached


def first_segment(model, n_calls_before):
    """The segment a request got in the first call after `n_calls_before` (its prefill's start)."""
    return [s for s in model.calls[n_calls_before] if s[2] > 1 or s[1] == 0][-1]


def test_a_request_takes_the_lowest_free_row_and_reuses_up_to_two_tokens_from_the_end():
    engine, model = scripted(2)
    a = [20, 3, 4, 5, 6, 7]
    assert finish(engine, a) == ([9, 9, 9], 0) and model.calls[0] == [(0, 0, 6)]
    for prompt, segment, copies in [
        ([20, 3, 4, 5, 8, 8, 8], (0, 4, 3), [(0, 1, 6)]),  # shares 4 with a, in place; the rest of a moves to row 1
        ([20, 3, 4, 5, 8, 8, 8], (0, 5, 2), []),  # the whole prompt: all but two
        ([20, 3, 4, 5, 8, 8, 8, 9, 9, 9, 10, 11], (0, 7, 5), []),  # the prompt and its reply: the reply's K/V are decoding's
        ([20, 3, 4, 5, 6, 7, 10], (0, 5, 2), [(1, 0, 5)]),  # a, from row 1 (no free row left to keep row 0's in)
        ([21], (0, 0, 1), [(0, 1, 7)]),  # one token: decoded; what row 0 held moves out
        ([21, 3], (0, 0, 2), []),  # two tokens: nothing to reuse; a one-token prompt's row holds nothing
        ([21, 3, 4], (0, 1, 2), []),
    ]:
        calls, copied = len(model.calls), len(model.cache.copies)
        ids, cached = finish(engine, prompt)
        assert first_segment(model, calls) == segment and cached == segment[1] and ids == [9, 9, 9], prompt
        assert model.cache.copies[copied:] == copies, prompt
    assert (engine.prefix.hits, engine.prefix.misses, engine.prefix.reused_tokens) == (5, 1, 22)  # 1-2 tokens: neither


def test_rows_are_evicted_least_recently_used_and_running_rows_are_copied_never_taken():
    engine, model = scripted(4)
    running = engine.add([22] + [3] * 9, greedy(max_tokens=50))
    engine.step()

    def holding():  # row -> the first id of the prompt whose K/V it holds
        return {row: prompt[0] for row, (_, prompt) in engine.prefix.prompt_of.items()}

    for first in (20, 21, 23, 24):  # each in row 1, the lowest free; what row 1 held moves to the row to evict
        assert finish(engine, [first, 4, 4, 4])[1] == 0
    assert holding() == {0: 22, 1: 24, 2: 23, 3: 21}  # empty rows first, then the least recently used: [20, ...]
    calls = len(model.calls)
    assert finish(engine, [21, 4, 4, 4, 5]) == ([9, 9, 9], 3) and first_segment(model, calls) == (1, 3, 2)
    calls = len(model.calls)
    assert finish(engine, [22] + [3] * 9 + [7, 7]) == ([9, 9, 9], 10)  # the running request's prompt, copied
    assert first_segment(model, calls) == (1, 10, 2) and model.cache.copies[-1] == (0, 1, 10)
    assert engine.requests[running].row == 0 and set(engine.requests[running].output_ids) == {9}


def test_copies_of_a_prompt_wait_for_the_first_then_copy_it():
    engine, model = scripted(3)
    rids = [engine.add([24, 3, 4, 5, 6, 7], greedy(max_tokens=2)) for _ in range(3)]
    engine.step()
    assert model.calls[0] == [(0, 0, 6)]  # the others wait: row 0 is prefilling all they share
    engine.step()
    assert model.calls[1][1:] == [(1, 4, 2), (2, 4, 2)] and [c[1:] for c in model.cache.copies] == [(1, 4), (2, 4)]
    while engine.has_unfinished():
        engine.step()
    assert engine.prefix.reused_tokens == 8 and not engine.requests and rids


def test_salts_keep_requests_apart():
    engine, _ = scripted(3)
    prompt = [25, 3, 4, 5, 6]
    cached = [finish(engine, prompt, greedy(max_tokens=2, cache_salt=salt))[1] for salt in ("a", "b", None, "a", None)]
    assert cached == [0, 0, 0, 3, 3]


# --- the radix tree ---------------------------------------------------------------------------------

def test_the_tree_finds_each_rows_shared_beginning_as_brute_force_does():
    rng = random.Random(0)
    tree, rows = PrefixTree(), {}

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    for _ in range(400):
        prompt = [rng.randint(0, 3) for _ in range(rng.randint(1, 12))]
        row = rng.randrange(6)
        if row in rows:
            tree.remove(row, rows.pop(row))
        if rng.random() < 0.8:
            tree.insert(row, prompt)
            rows[row] = prompt
        query = [rng.randint(0, 3) for _ in range(rng.randint(1, 14))]
        want = {r: common(p, query) for r, p in rows.items() if common(p, query)}
        assert tree.shared(query) == want
    for row in list(rows):
        tree.remove(row, rows.pop(row))
    assert not tree
