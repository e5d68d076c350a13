"""Speculative decoding: guessed tokens checked in one step never change a request's tokens, logprobs
or random draws (float32), and guesses are actually accepted where the text repeats.

The real model (float32) runs the same requests on engines over one model with speculation off and
on ("ngram": every request guesses its k, so rows hold many tokens and the thin product runs in
chunks; "auto": only into the rows the products pad to anyway). The verification itself is checked
against one-token decodes, logits bit for bit.
"""

import random

import pytest
import torch

from llama_lite import Llama, SamplingParams
from llama_lite.engine.engine import Engine
from llama_lite.engine.speculation import Drafter, plan_drafts
from tests.engine.test_engine import corpus_prompts, mixed_params
from tests.engine.test_prefix_cache import run

STORY = ("Once upon a time a small fox lived at the edge of a forest. Every morning the small fox walked to the "
         "river, drank some water, and walked back to the edge of the forest. ")


def engine(llm, speculative):
    return Engine(llm.model, llm.tokenizer, llm.generator, speculative=speculative)


def repeating(llm, times=3):
    """A prompt whose text repeats: its continuation is mostly what came before."""
    return llm.tokenizer.encode(STORY * times, False, False)


@torch.inference_mode()
def test_verified_logits_equal_one_token_decodes(llm):
    """11 tokens of one row fed as one-token segments of one step, beside two other rows decoding (13
    decoding tokens: two chunks of the thin product, 11 query slots in one row): each token's logits
    equal, bit for bit, those of the same token decoded alone one step at a time."""
    model = llm.model
    prompt = repeating(llm, 1)[:40]
    ids = list(range(100, 111))

    def prefill():
        for row in range(8):
            model.forward_segments(torch.tensor(prompt), [(row, 0, len(prompt))], torch.tensor([len(prompt) - 1]))

    prefill()
    alone = torch.cat([model.forward_segments(torch.tensor([t]), [(0, len(prompt) + i, 1)], torch.tensor([0]))
                       for i, t in enumerate(ids)])
    prefill()
    segments = [(2, len(prompt), 1)] + [(0, len(prompt) + i, 1) for i in range(len(ids))] + [(5, len(prompt), 1)]
    tokens = [7] + ids + [9]
    verified = model.forward_segments(torch.tensor(tokens), segments, torch.arange(len(tokens)))
    assert torch.equal(verified[1:-1], alone)


def test_mixed_requests_are_bit_for_bit_those_without_speculation(llm):
    """32 requests (greedy, seeded temperature/top-p/top-k, penalties, stop strings, logprobs and top
    logprobs, echo; corpus prompts and repeating ones) arriving over several steps, 8 rows: ids, text,
    finish reason, logprobs and top logprobs equal with speculation off, "ngram" and "auto"; and
    guesses were accepted (so the comparison covered multi-token steps)."""
    rng = random.Random(3)
    prompts = corpus_prompts(llm.tokenizer, [rng.randint(2, 120) for _ in range(24)], seed=11)
    prompts += [repeating(llm, 2)[i:] for i in range(8)]
    params = [mixed_params(i, rng) for i in range(24)]
    params += [SamplingParams(temperature=0, max_tokens=24, logprobs=True, top_logprobs=2),
               SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=24, logprobs=True),
               SamplingParams(temperature=0, max_tokens=20, frequency_penalty=0.3),
               SamplingParams(temperature=0.5, seed=6, max_tokens=20, presence_penalty=0.4, logprobs=True),
               SamplingParams(temperature=0, max_tokens=24, stop=["water"]),
               SamplingParams(temperature=1.0, top_k=5, seed=7, max_tokens=24),
               SamplingParams(temperature=0, max_tokens=17, echo=True, logprobs=True),
               SamplingParams(temperature=0.3, seed=8, max_tokens=24, stop=["forest."])]
    schedule = [(i // 4, prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
    off, _ = run(engine(llm, "off"), schedule)
    for mode in ("ngram", "auto"):
        speculating = engine(llm, mode)
        got, _ = run(speculating, schedule)
        assert got == off, mode
        assert speculating.acceptance.accepted > 0, mode


def test_repeated_text_is_guessed_accepted_and_exact(llm):
    """Greedy, alone, on text that repeats: speculation on ("auto") gives the same ids in fewer steps,
    several tokens arriving in one output, and reports what it accepted."""
    params = SamplingParams(temperature=0, max_tokens=40)
    results = {}
    for mode in ("off", "auto"):
        e = engine(llm, mode)
        rid = e.add(repeating(llm), params)
        steps, ids, sizes = 0, [], []
        while e.has_unfinished():
            steps += 1
            for out in e.step():
                assert out.request_id == rid
                ids += out.token_ids
                sizes.append(len(out.token_ids))
        results[mode] = (ids, steps, max(sizes), e.acceptance)
    assert results["auto"][0] == results["off"][0] and len(results["off"][0]) == 40
    assert results["auto"][1] < results["off"][1] and results["auto"][2] > 1 and results["off"][2] == 1
    acceptance = results["auto"][3]
    assert acceptance.accepted > 0 and acceptance.tokens_per_step > 1.5


def test_a_stop_string_inside_an_accepted_run_cuts_there(llm):
    """A stop string that the model's text reaches in the middle of a step's accepted guesses: the text
    ends exactly before it, as without speculation, and the tokens after it are not reported."""
    prompt, params = repeating(llm), SamplingParams(temperature=0, max_tokens=40)
    e = engine(llm, "ngram")
    e.add(prompt, params)
    text, stop = "", None
    while e.has_unfinished():
        for out in e.step():
            if stop is None and len(out.token_ids) >= 3:  # a run: stop on its second token's text
                piece = llm.tokenizer.decode(out.token_ids[1:2]).strip()
                if len(piece) >= 3 and piece not in text + llm.tokenizer.decode(out.token_ids[:1]):
                    stop = piece
            text += out.text
    assert stop is not None
    expected = text[: text.index(stop)]
    for mode in ("off", "ngram"):
        (ids, got, reason, _, _), = run(engine(llm, mode),
                                        [(0, prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))])[0]
        assert (got, reason) == (expected, "stop"), mode


def test_max_tokens_is_never_exceeded(llm):
    """Requests whose guesses would run past max_tokens (1..6) get exactly max_tokens ids, those
    without speculation."""
    schedule = [(0, repeating(llm)[i:], SamplingParams(temperature=0, max_tokens=n)) for i, n in enumerate(range(1, 7))]
    off, _ = run(engine(llm, "off"), schedule)
    got, _ = run(engine(llm, "ngram"), schedule)
    assert got == off
    assert [len(ids) for ids, *_ in got] == list(range(1, 7))
    assert all(reason == "length" for _, _, reason, _, _ in got)


def test_constrained_requests_do_not_guess(llm):
    """A request with a grammar never guesses (its matcher advances one token at a time); its output
    is the same with speculation on."""
    params = SamplingParams(temperature=0, max_tokens=12, regex="(fox |forest )+")
    e = engine(llm, "ngram")
    (on, *_), = run(e, [(0, repeating(llm), params)])[0]
    (off, *_), = run(engine(llm, "off"), [(0, repeating(llm), params)])[0]
    assert on == off and e.acceptance.steps == 0


def test_drafter_guesses_what_followed_the_longest_suffix():
    drafter = Drafter([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 2, 3])
    assert drafter.propose(3) == [4, 6, 7]  # "2 3" last came before 4 6 7 (the newest earlier occurrence)
    drafter.extend([4])
    assert drafter.propose(2) == [6, 7]  # "2 3 4" (three tokens) wins over shorter suffixes
    assert Drafter([5, 6, 7]).propose(3) == []  # nothing repeats
    assert drafter.propose(0) == []


def test_k_grows_on_full_accepts_and_pauses_after_misses():
    drafter = Drafter([1, 2, 1, 2, 1, 2])
    k = drafter.k
    drafter.update(k, k)
    assert drafter.k == 2 * k
    drafter.update(drafter.k, 1)
    assert drafter.k == 2
    drafter.update(2, 0)
    assert drafter.pause == 2 and drafter.propose(5, pausing=False)  # where guesses cost nothing it goes on
    assert drafter.propose(5) == [] and drafter.propose(5) == [] and drafter.propose(5)
    # a budget: rows first, then guesses in order while it lasts; none: each its k
    both = [Drafter([1, 2, 1, 2, 1, 2]), None, Drafter([1, 2, 1, 2, 1, 2])]
    assert plan_drafts(both, [9, 9, 9], 4, pausing=False) == [[1], [], []]
    assert (plan_drafts([Drafter([1, 2, 3, 4, 5, 1, 2]), None, Drafter([1, 2, 3, 4, 5, 1, 2])], [9, 9, 2])
            == [[3, 4, 5], [], [3, 4]])


def test_bad_speculative_settings_are_refused(smollm_path):
    with pytest.raises(ValueError, match="speculative must be one of"):
        Llama.build(smollm_path, speculative="yes")
    with pytest.raises(ValueError, match="draft models are not supported"):
        Llama.build(smollm_path, draft=smollm_path)
