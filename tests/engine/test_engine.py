"""The engine: requests that join and leave a running batch, each getting exactly what it gets alone.

The real model (float32) runs mixed requests arriving at different steps against each request run
alone; a scripted model shows the scheduling (admission, batched and chunked prefill, abort) and stop
strings; SamplingParams and the incremental detokenizer are checked on their own.
"""

import random

import pytest
import torch
from torch import nn

from llama_lite import Llama, ModelArgs, SamplingParams, Tokenizer
from llama_lite.text.detokenizer import Detokenizer
from tests.conftest import ROOT

CORPUS = ROOT / "tokenizer" / "corpus.txt"


def run_alone(engine, prompt, params):
    """(token ids, text, finish reason, logprobs, top logprobs) of one request in an idle engine."""
    assert not engine.has_unfinished()
    rid = engine.add(prompt, params)
    result = collect(engine, [rid])[rid]
    assert not engine.has_unfinished()
    return result


def collect(engine, rids, add_later=()):
    """Step until every request is done; `add_later`: (step, prompt, params) added at that step."""
    results = {rid: [[], [], None, [], []] for rid in rids}
    pending = sorted(add_later, key=lambda a: a[0])
    step = 0
    while engine.has_unfinished() or pending:
        while pending and pending[0][0] <= step:
            _, prompt, params = pending.pop(0)
            results[engine.add(prompt, params)] = [[], [], None, [], []]
        for out in engine.step():
            r = results[out.request_id]
            r[0] += out.token_ids
            r[1].append(out.text)
            r[3] += out.logprobs or []
            r[4] += out.top_logprobs or []
            if out.finished:
                r[2] = out.finish_reason
        step += 1
    return {rid: (ids, "".join(text), reason, lps, tops) for rid, (ids, text, reason, lps, tops) in results.items()}


def corpus_prompts(tokenizer, lengths, seed=0):
    ids = tokenizer.encode(CORPUS.read_text(encoding="utf-8")[:200_000], bos=False, eos=False)
    rng = random.Random(seed)
    prompts = []
    for n in lengths:
        start = rng.randrange(len(ids) - n)
        prompts.append(ids[start : start + n])
    return prompts


def mixed_params(i, rng):
    kind = i % 6
    max_tokens = rng.randint(1, 8)
    if kind == 0:
        return SamplingParams(temperature=0, max_tokens=max_tokens)
    if kind == 1:
        return SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=max_tokens, logprobs=True)
    if kind == 2:
        return SamplingParams(temperature=1.0, top_p=1.0, top_k=20, seed=1000 + i, max_tokens=max_tokens)
    if kind == 3:
        return SamplingParams(temperature=0, max_tokens=12, stop=["the ", "\n\n", ". "], logprobs=True, top_logprobs=3)
    if kind == 4:
        return SamplingParams(temperature=0.7, seed=i, max_tokens=max_tokens, stop=["ing", ","], frequency_penalty=0.5)
    return SamplingParams(temperature=0, max_tokens=max_tokens, presence_penalty=1.5, echo=i % 12 == 5)


def test_requests_arriving_at_any_step_get_what_they_get_alone(llm):
    """48 requests (prompts of 1-300 tokens; greedy, seeded temperature/top-p/top-k, stop strings,
    penalties, logprobs, echo) added at different steps while others run, 8 rows: every request's
    ids, text, finish reason and logprobs equal the same request run alone, bit for bit."""
    rng = random.Random(7)
    lengths = [1, 300, 2, 150] + [int(300 ** rng.random()) for _ in range(44)]  # log-uniform in 1..300
    prompts = corpus_prompts(llm.tokenizer, lengths)
    params = [mixed_params(i, rng) for i in range(48)]
    engine = llm.engine
    first = [engine.add(prompts[i], params[i]) for i in range(6)]
    later = [(rng.randint(0, 120), prompts[i], params[i]) for i in range(6, 48)]
    together = collect(engine, first, later)
    assert len(together) == 48
    reasons = set()
    ordered = [together[rid] for rid in first] + [None] * 42
    # Requests added later got ids in the order they were added; match them by (prompt, params) instead.
    later_results = sorted((rid, r) for rid, r in together.items() if rid not in first)
    for (_, prompt, _), (_, r) in zip(sorted(later, key=lambda a: a[0]), later_results):
        ordered[next(i for i in range(6, 48) if ordered[i] is None and prompts[i] is prompt)] = r
    for i, result in enumerate(ordered):
        alone = run_alone(engine, prompts[i], params[i])
        assert result == alone, (i, params[i])
        reasons.add(result[2])
    assert reasons == {"stop", "length"}


def test_seeded_sampling_repeats_whatever_the_batch_holds(llm):
    prompt = llm.tokenizer.encode("Once upon a time", False, False)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=24)
    alone = run_alone(llm.engine, prompt, params)
    others = corpus_prompts(llm.tokenizer, [40, 3, 90, 7, 12], seed=3)
    rids = [llm.engine.add(p, SamplingParams(temperature=1.0, max_tokens=30)) for p in others[:3]]
    rid = llm.engine.add(prompt, params)
    rids += [llm.engine.add(p, SamplingParams(temperature=1.0, max_tokens=30)) for p in others[3:]]
    assert collect(llm.engine, rids + [rid])[rid] == alone
    assert run_alone(llm.engine, prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=24)) != alone


def test_stream_pieces_join_to_the_whole_text_and_stop_strings_never_stream(llm):
    prompt = llm.tokenizer.encode("The capital of France is", False, False)
    [whole] = llm.text_completion(["The capital of France is"], max_gen_len=24, temperature=0)
    text = whole["generation"]  # " Paris.\n\nThe answer is: 2018-01..."
    stop = text[text.index("is:") : text.index("is:") + 6]  # "is: 20": spans several tokens
    [cut] = llm.text_completion(["The capital of France is"], max_gen_len=24, temperature=0, stop=[stop])
    assert cut["generation"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"
    pieces = list(llm.stream(prompt, 24, temperature=0, stop=[stop]))
    assert "".join(pieces) == cut["generation"]
    for seed in range(2):
        kw = dict(temperature=1.0, top_p=0.9, seed=seed, stop=["\n"])
        pieces = list(llm.stream(prompt, 24, **kw))
        [done] = llm.text_completion(["The capital of France is"], max_gen_len=24, **kw)
        assert "".join(pieces) == done["generation"] and "\n" not in done["generation"]


def test_streams_share_the_batch_and_a_closed_stream_is_aborted(llm):
    ids = [llm.tokenizer.encode(t, False, False) for t in ("One, two,", "The sky is", "def f(x):")]
    alone = [llm.text_completion([llm.tokenizer.decode(i)], max_gen_len=16, temperature=0)[0]["generation"] for i in ids]
    streams = [llm.stream(i, 16, temperature=0) for i in ids]
    texts = ["", "", ""]
    live = set(range(3))
    while live:  # interleaved: each next() may step the engine for all three
        for k in sorted(live):
            piece = next(streams[k], None)
            if piece is None:
                live.discard(k)
            else:
                texts[k] += piece
    assert texts == alone
    stream = llm.stream(ids[0], 40, temperature=0)
    next(stream)
    assert llm.engine.has_unfinished()
    stream.close()
    assert not any(r for r in llm.engine.requests)  # aborted at once; its row is free
    llm.engine.step()  # reports the abort
    assert not llm.engine.has_unfinished()


def test_logprobs_top_logprobs_and_penalties_against_a_full_forward(llm):
    prompt = llm.tokenizer.encode("Repeat after me: la la la la", False, False)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, frequency_penalty=0.9,
                            presence_penalty=0.4, echo=True)
    ids, text, reason, lps, tops = run_alone(llm.engine, prompt, params)
    assert ids[: len(prompt)] == prompt and text.startswith("Repeat after me")
    assert len(lps) == len(tops) == len(ids) and lps[0] == 0.0 and tops[0] == []
    with torch.inference_mode():
        full = torch.log_softmax(llm.model(torch.tensor([ids]), 0)[0], -1)  # (len, vocab)
        logits = llm.model(torch.tensor([ids]), 0)[0]
    for j in range(1, len(ids)):
        assert abs(lps[j] - full[j - 1, ids[j]].item()) < 1e-4
        assert [t for t, _ in tops[j]] == full[j - 1].topk(3).indices.tolist()
    counts = torch.zeros(logits.shape[-1])
    for j in range(len(prompt), len(ids)):  # greedy under OpenAI's penalties over the generated ids so far
        penalized = logits[j - 1] - 0.9 * counts - 0.4 * (counts > 0).float()
        assert ids[j] == penalized.argmax().item()
        counts[ids[j]] += 1
    plain = run_alone(llm.engine, prompt, SamplingParams(temperature=0, max_tokens=12))
    assert plain[0] != ids[len(prompt) :]  # the penalties did change the reply


def test_detokenizing_work_does_not_grow_with_the_reply(smollm_path):
    """Fed 600 ids one at a time, the detokenizer decodes a window of a few ids each time (not the
    whole text so far) and its pieces still join to decode() of all of them."""
    tok = Tokenizer.from_file(smollm_path)
    ids = tok.encode(CORPUS.read_text(encoding="utf-8")[:3000] + " 안녕하세요 🙂 ½ naïve", bos=False, eos=False)[-600:]
    lengths, decode = [], tok.decode
    tok.decode = lambda window: lengths.append(len(window)) or decode(window)
    detok = Detokenizer(tok, stop=["never in this text"])
    text = "".join(detok.add([i]) for i in ids) + detok.finish()
    assert text == decode(ids) and len(ids) == 600
    assert max(lengths) <= 8  # a window of a few ids, not the whole reply


def test_bad_requests_are_refused_when_made(llm):
    engine = llm.engine
    for prompt, message in [([], "non-empty"), ([49152], "outside"), ([1] * 512, "does not fit"), ("hi", "non-empty")]:
        with pytest.raises(ValueError, match=message):
            engine.add(prompt)
    with pytest.raises(ValueError, match="does not fit"):
        engine.add([1] * 500, SamplingParams(max_tokens=13))
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add([1], {"temperature": 0})
    assert not engine.has_unfinished()
    rid = engine.add([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="engine's unfinished requests hold"):
        llm.generate([[1, 2]], 2)
    engine.abort(rid)
    engine.step()
    assert not engine.has_unfinished() and llm.generate([[1, 2]], 2, temperature=0)[0]


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1, "temperature must be a finite number >= 0"),
    ("temperature", float("inf"), "temperature"),
    ("top_p", 0, r"top_p must be in \(0, 1\]"),
    ("top_k", 0, "top_k must be a whole number >= 1"),
    ("max_tokens", 0, "max_tokens must be a whole number >= 1"),
    ("max_tokens", 2.5, "max_tokens"),
    ("stop", [""], "stop must be a string or a list of non-empty strings"),
    ("stop", [3], "stop"),
    ("seed", "x", "seed must be a whole number"),
    ("logprobs", 1, "logprobs must be True or False"),
    ("top_logprobs", 21, "top_logprobs must be a whole number in 0..20"),
    ("presence_penalty", 2.5, r"presence_penalty must be a number in \[-2, 2\]"),
    ("frequency_penalty", float("nan"), "frequency_penalty"),
])
def test_sampling_params_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        SamplingParams(**{field: value})


def test_sampling_params_normalise_stop_and_need_logprobs_for_top_logprobs():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        SamplingParams(top_logprobs=2)


# --- scheduling, on a scripted model ---------------------------------------------------------------

STOP = 1


class ScriptedModel(nn.Module):
    """Greedy decoding follows a script picked by the prompt's first token: the token after
    position p is script[p] (STOP past its end). Logs the segments of every call."""

    def __init__(self, scripts, max_batch_size, vocab=32, max_seq_len=64):
        super().__init__()
        self.params = ModelArgs(dim=1, n_layers=0, n_heads=1, n_kv_heads=1, vocab_size=vocab, hidden_dim=1,
                                max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.scripts, self.row_script, self.calls = scripts, {}, []

    def draft_budget(self, n_decoding):
        return n_decoding, True  # no speculative guesses: the calls are exactly as scripted

    def adopt_compiled_step(self):
        pass  # no compiled step to take between requests

    def forward_segments(self, tokens, segments, logits_at):
        self.calls.append(list(segments))
        where, first = [], 0
        for row, start, length in segments:
            if start == 0:
                self.row_script[row] = self.scripts[int(tokens[first])]
            where += [(row, p) for p in range(start, start + length)]
            first += length
        logits = torch.zeros(len(logits_at), self.params.vocab_size)
        for j, t in enumerate(logits_at.tolist()):
            row, p = where[t]
            script = self.row_script[row]
            logits[j, script[p] if p < len(script) else STOP] = 10.0
        return logits


class PieceTokenizer(Tokenizer):
    """Each id decodes to one fixed string; id 1 is the stop token."""

    PIECES = ["<pad>", "<END>", "<", "E", "N", "D", ">", "a", " b"] + [f"w{i} " for i in range(9, 32)]
    bos_id, eos_id, pad_id, n_words, stop_ids, add_bos, chat_template = None, STOP, 0, 32, frozenset({STOP}), False, None

    def _encode(self, s):
        return [self.PIECES.index(s)]

    def _decode(self, ids):
        return "".join(self.PIECES[i] for i in ids)


def scripted(scripts, max_batch_size=2, max_step_tokens=512):
    model = ScriptedModel(scripts, max_batch_size)
    llm = Llama(model, PieceTokenizer(), torch.Generator())
    llm.engine.max_step_tokens = max_step_tokens
    return llm, model


def greedy(max_tokens=16, **kw):
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def test_a_finished_row_takes_the_next_prompt_at_once_and_prompts_prefill_together():
    # Two rows; prompt 0 (script 20) runs 10 tokens while prompts 1-4 run 2 each, one after another.
    scripts = {20: [0] + [9] * 10, 21: [5, 6], 22: [0, 0, 7, 8], 23: [5, 5], 24: [0, 6, 6]}
    llm, model = scripted(scripts)
    prompts = [[20, 3], [21], [22, 3, 3], [23], [24, 4]]
    rids = [llm.engine.add(p, greedy()) for p in prompts]
    results = collect(llm.engine, rids)
    assert [results[r][0] for r in rids] == [[9] * 10, [5, 6], [7, 8], [5, 5], [6, 6]]
    assert [results[r][2] for r in rids] == ["stop"] * 5
    assert model.calls[0] == [(0, 0, 2), (1, 0, 1)]  # two prompts prefilled in one call
    # Row 1 serves prompts 1-4 one after another while row 0 is on prompt 0: a finished request's row
    # is prefilled with the next prompt in the very next call, beside the running decode.
    assert model.calls[3] == [(0, 4, 1), (1, 0, 3)]
    # Each short request takes three calls (prefill, one decode, the decode that yields STOP), back to
    # back in row 1: 12 calls in all, while fixed batches of two would take 11 + 3 + 3 = 17.
    assert len(model.calls) == 12


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode():
    scripts = {20: [9] * 40, 21: [0] * 29 + [5] * 20}
    llm, model = scripted(scripts, max_step_tokens=8)
    a = llm.engine.add([20], greedy(max_tokens=6))
    [first] = llm.engine.step()
    b = llm.engine.add([21] + [3] * 29, greedy(max_tokens=3))  # 30 prompt tokens
    results = collect(llm.engine, [a, b])
    assert first.token_ids + results[a][0] == [9] * 6 and results[b][0] == [5] * 3
    chunks = [[s for s in call if s[0] == 1] for call in model.calls[1:5]]
    assert chunks == [[(1, 0, 7)], [(1, 7, 7)], [(1, 14, 7)], [(1, 21, 7)]]  # 7 prompt tokens + 1 decode a step
    assert all(any(s[0] == 0 for s in call) for call in model.calls[1:5])  # request a decoded meanwhile


def test_a_prompt_prefilled_in_chunks_alone_equals_it_prefilled_at_once():
    """Steps that only feed prompt chunks (no logits due) work, and chunking changes no bit."""
    from tests.model.test_model import tiny_model

    llm = Llama(tiny_model(max_batch_size=2, vocab_size=32), PieceTokenizer(), torch.Generator())
    prompt, params = list(range(2, 25)), SamplingParams(temperature=0, max_tokens=6, logprobs=True)
    llm.engine.max_step_tokens = 5  # 23 prompt tokens: four steps with no token due, then the first
    chunked = run_alone(llm.engine, prompt, params)
    llm.engine.max_step_tokens = 512
    assert chunked == run_alone(llm.engine, prompt, params) and len(chunked[0]) == 6


def test_an_aborted_request_gives_its_row_to_a_waiting_one_at_the_next_step():
    scripts = {20: [9] * 30, 21: [8] * 30, 22: [7] * 30}
    llm, model = scripted(scripts)
    a, b, c = (llm.engine.add([k], greedy()) for k in (20, 21, 22))
    llm.engine.step()
    assert llm.engine.requests[c].row is None  # waiting: both rows are busy
    llm.engine.abort(a)
    outs = llm.engine.step()
    assert llm.engine.requests[c].row == 0
    assert model.calls[-1] == [(1, 1, 1), (0, 0, 1)]  # b decodes, c is prefilled into a's row
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs][0] == (a, True, "abort")
    llm.engine.abort(a)  # already finished: nothing happens
    llm.engine.abort(b), llm.engine.abort(c)
    llm.engine.step()
    assert not llm.engine.has_unfinished()


def test_stop_strings_across_tokens_are_cut_and_never_streamed():
    # "a", then "<", "E", "a" (not the stop), then "<", "E", "N", "D", ">" spelled out, then " b".
    scripts = {7: [2, 3, 7, 2, 3, 4, 5, 6, 8, 8, 8]}
    llm, _ = scripted(scripts)
    pieces = list(llm.stream([7], 20, temperature=0, stop=["<END>"]))
    assert pieces == ["<", "Ea"] or pieces == ["<Ea"]
    [done] = llm.text_completion(["a"], max_gen_len=20, temperature=0, stop=["<END>"])
    assert "".join(pieces) == done["generation"] == "<Ea" and done["finish_reason"] == "stop"
    [plain] = llm.text_completion(["a"], max_gen_len=20, temperature=0)
    assert plain["generation"] == "<Ea<END> b b b" and plain["finish_reason"] == "stop"


# --- the detokenizer alone -----------------------------------------------------------------------

def test_detokenizer_holds_half_characters_and_possible_stop_strings(smollm_path):
    tok = Tokenizer.from_file(smollm_path)
    ids = tok.encode("Hello 안녕 🙂 world. The end", bos=False, eos=False)
    detok = Detokenizer(tok, stop=["The end"])
    pieces = [detok.add([i]) for i in ids] + [detok.finish()]
    assert "".join(pieces) == "Hello 안녕 🙂 world. " and detok.stopped
    assert all("\ufffd" not in p for p in pieces)
    assert not any(p.endswith("The") for p in pieces)  # "The" waited: it may have begun "The end"
    detok = Detokenizer(tok)
    assert "".join([detok.add([i]) for i in ids] + [detok.finish()]) == tok.decode(ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_cuda_equals_each_request_alone(smollm_path):
    llm = Llama.build(smollm_path, max_seq_len=512, max_batch_size=8, device="cuda", dtype="float32", seed=0)
    prompts = corpus_prompts(llm.tokenizer, [1, 7, 120, 300, 33])
    params = [SamplingParams(temperature=0, max_tokens=16), SamplingParams(temperature=0.9, seed=5, max_tokens=16)] * 3
    rids = [llm.engine.add(p, q) for p, q in zip(prompts, params)]
    together = collect(llm.engine, rids)
    for rid, p, q in zip(rids, prompts, params):
        alone = run_alone(llm.engine, p, q)
        assert together[rid][0] == alone[0]


def test_an_unbounded_generation_that_loops_verbatim_ends():
    """max_gen_len=None runs to the cache's end, but a small model can repeat one phrase for minutes
    ("Hi" on SmolLM2, 1 sampled run in 4): once its last 256 tokens repeat one span, it ends there."""
    rng = random.Random(0)
    varied = [rng.randrange(9, 32) for _ in range(700)]
    scripts = {20: [9, 10, 11] * 400, 21: varied[:100] + [12, 13] * 400, 22: varied}
    model = ScriptedModel(scripts, 2, max_seq_len=1024)
    llm = Llama(model, PieceTokenizer(), torch.Generator())
    looped, looped_later, never = llm._complete([[20], [21], [22]], None, temperature=0)
    assert (len(looped["tokens"]), looped["finish_reason"]) == (256, "length")  # not 1022
    assert (len(looped_later["tokens"]), looped_later["finish_reason"]) == (100 + 256, "length")
    assert never["tokens"] == varied and never["finish_reason"] == "stop"
    assert len(llm._complete([[20]], 600, temperature=0)[0]["tokens"]) == 600  # a limit asked for is kept
