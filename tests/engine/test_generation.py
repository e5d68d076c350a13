"""Generation: greedy tokens against transformers, batches against each prompt alone, truncation
and early stop on a scripted model, logprobs against a full forward pass, streaming, chat. The engine
itself (scheduling, stop strings, batch invariance) is tests/engine/test_engine.py."""

import pytest
import torch
from torch import nn

from llama_lite import Llama, ModelArgs, Tokenizer
from tests.tiny_gguf import write_tiny_gguf

GREEDY_PROMPTS = [
    "The capital of France is",
    "def is_prime(n):",
    "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n",
]


def test_greedy_matches_transformers(llm, hf_model):
    stops = sorted(llm.tokenizer.stop_ids)
    for text in GREEDY_PROMPTS:
        ids = llm.tokenizer.encode(text, bos=False, eos=False)
        ours, _ = llm.generate([ids], max_gen_len=64, temperature=0)
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=stops, pad_token_id=2)
        ref = ref[0, len(ids) :].tolist()
        ref = ref[: next((i for i, t in enumerate(ref) if t in stops), len(ref))]
        assert ours[0] == ref, text
        assert len(ours[0]) > 0


def test_batch_rows_equal_each_prompt_alone(llm):
    texts = [
        "Hi",
        "Write a long story about a dragon who lived in a mountain made of glass and guarded a library of "
        "forgotten books, each one holding the memory of a person who had wandered into the valley below.",
        "<|im_start|>user\nList the planets of the solar system.<|im_end|>\n<|im_start|>assistant\n",
        "1, 2, 3, 4,",
    ]
    prompts = [llm.tokenizer.encode(t, False, False) for t in texts]
    together, _ = llm.generate(prompts, max_gen_len=24, temperature=0)
    for ids, row in zip(prompts, together):
        alone, _ = llm.generate([ids], max_gen_len=24, temperature=0)
        assert row == alone[0]


def test_logprobs_match_a_full_forward(llm):
    prompts = [llm.tokenizer.encode(t, False, False) for t in ("The sky is", "Once upon a time, in a faraway land,")]
    tokens, logprobs = llm.generate(prompts, max_gen_len=8, temperature=0.8, logprobs=True)
    echoed, echoed_logprobs = llm.generate(prompts, max_gen_len=8, temperature=0, logprobs=True, echo=True)
    echoed_new = [(p, e[len(p) :], elp[len(p) :]) for p, e, elp in zip(prompts, echoed, echoed_logprobs)]
    for ids, new, lp in list(zip(prompts, tokens, logprobs)) + echoed_new:
        assert len(lp) == len(new) > 0
        seq = ids + new
        with torch.inference_mode():
            full = torch.log_softmax(llm.model(torch.tensor([seq]), 0)[0], -1)
        want = [full[len(ids) + j - 1, t].item() for j, t in enumerate(new)]
        assert max(abs(a - b) for a, b in zip(lp, want)) < 1e-4
    # Echoed prompt tokens are scored too (the first has nothing before it: 0).
    ids, lp = prompts[1], echoed_logprobs[1]
    with torch.inference_mode():
        full = torch.log_softmax(llm.model(torch.tensor([ids]), 0)[0], -1)
    assert lp[0] == 0.0
    assert max(abs(lp[j] - full[j - 1, ids[j]].item()) for j in range(1, len(ids))) < 1e-4


def test_text_completion_list_longer_than_the_batch_equals_each_prompt_alone(llm):
    """Continuous batching (rows refilled as replies end, each at its own position) gives, for every
    prompt, the greedy tokens of `generate` on that prompt alone; in input order."""
    prompts = [f"{n} + {n} =" if n % 2 else "Tell me about the history of the number " * (n % 4 + 1) + str(n) for n in range(11)]
    results = llm.text_completion(prompts, max_gen_len=12, temperature=0)  # 11 prompts, max_batch_size 8
    assert len(results) == 11
    lengths = set()
    for prompt, result in zip(prompts, results):
        alone, _ = llm.generate([llm.tokenizer.encode(prompt, False, False)], max_gen_len=12, temperature=0)
        assert result["tokens"] == alone[0]
        assert result["generation"] == llm.tokenizer.decode(result["tokens"])
        lengths.add(len(alone[0]))
    assert len(lengths) > 1  # replies end at different steps, so rows were refilled mid-batch


def test_text_completion_echo_and_logprobs(llm):
    [result] = llm.text_completion(["Paris is the capital of"], max_gen_len=5, temperature=0, logprobs=True, echo=True)
    prompt_ids = llm.tokenizer.encode("Paris is the capital of", False, False)
    assert result["tokens"][: len(prompt_ids)] == prompt_ids
    assert result["generation"].startswith("Paris is the capital of")
    assert len(result["logprobs"]) == len(result["tokens"])


def test_chat_prompt_matches_transformers_template(llm, hf_tokenizer):
    dialog = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    want = hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)
    assert llm.chat_prompt_tokens(dialog) == hf_tokenizer.encode(want, add_special_tokens=False)
    [result] = llm.chat_completion([dialog], max_gen_len=16, temperature=0)
    assert result["generation"]["role"] == "assistant"
    tokens, _ = llm.generate([llm.chat_prompt_tokens(dialog)], 16, temperature=0)
    assert result["generation"]["content"] == llm.tokenizer.decode(tokens[0])


def test_stream_joins_to_the_generated_text(llm):
    dialog = [{"role": "user", "content": "Write the Korean word for 'thank you' and a smiling emoji."}]
    ids = llm.chat_prompt_tokens(dialog)
    for temperature in (0, 0.9):
        llm.generator.manual_seed(3)
        pieces = list(llm.stream(ids, 24, temperature=temperature))
        llm.generator.manual_seed(3)
        tokens, _ = llm.generate([ids], 24, temperature=temperature)
        text = llm.tokenizer.decode(tokens[0])
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_stream_never_splits_a_character(tmp_path):
    """A tiny random model emits arbitrary bytes; pieces still join to decode() exactly."""
    llm = Llama.build(write_tiny_gguf(tmp_path / "tiny.gguf"), max_seq_len=128, device="cpu", dtype="float32", seed=4)
    ids = llm.tokenizer.encode("hello", False, False)
    for seed in range(3):
        llm.generator.manual_seed(seed)
        pieces = list(llm.stream(ids, 60, temperature=1.0, top_p=1.0))
        llm.generator.manual_seed(seed)
        tokens, _ = llm.generate([ids], 60, temperature=1.0, top_p=1.0)
        assert "".join(pieces) == llm.tokenizer.decode(tokens[0])


def test_seed_makes_runs_repeat(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    runs = []
    for seed in (11, 11, 12):
        llm = Llama.build(path, max_seq_len=64, device="cpu", dtype="float32", seed=seed)
        runs.append(llm.generate([[5, 6, 7], [8]], 20, temperature=1.0, top_p=1.0)[0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_each_prompt_samples_by_its_index_whatever_the_batch(tmp_path):
    """A job's prompt i samples from its own generator seeded seed + i: its text does not depend on
    the batch size, on the other prompts, nor (without seed=) on anything but the Llama's seed."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    prompts = ["he", "the the", "t", "eh he", "h"]
    kw = dict(max_gen_len=12, temperature=1.0, top_p=1.0)
    small, big = (Llama.build(path, max_seq_len=64, max_batch_size=rows, device="cpu", dtype="float32", seed=11)
                  for rows in (2, 8))
    by_llama_seed = [r["tokens"] for r in small.text_completion(prompts, **kw)]
    assert by_llama_seed == [r["tokens"] for r in big.text_completion(prompts, **kw)]  # 2 rows at a time or 8
    assert len(set(map(tuple, by_llama_seed))) == len(prompts)
    seeded = [r["tokens"] for r in small.text_completion(prompts, seed=7, **kw)]
    for i, prompt in enumerate(prompts):  # alone, or the job resumed at prompt i
        assert small.text_completion([prompt], seed=7 + i, **kw)[0]["tokens"] == seeded[i]
        assert big.text_completion(prompts[i:], seed=7 + i, **kw)[0]["tokens"] == seeded[i]
    ids = [small.tokenizer.encode(p, False, False) for p in prompts]
    first = small.text_completion([prompts[-1]], seed=7, **kw)[0]["tokens"]
    assert dict(big.as_completed(ids[::-1], seed=7, **kw))[0]["tokens"] == first  # its seed follows its index
    rows = small.generate(ids[:2], 12, temperature=1.0, top_p=1.0)[0]  # Meta's loop: row i by its index too
    small.generator.manual_seed(3)
    streamed = list(small.stream(ids[1], 12, temperature=1.0, top_p=1.0))
    small.generator.manual_seed(3)
    assert "".join(streamed) == small.tokenizer.decode(small.generate([ids[1]], 12, temperature=1.0, top_p=1.0)[0][0])
    assert rows[0] != rows[1]


def test_generate_after_a_closed_stream(llm):
    ids = llm.tokenizer.encode("Once upon a time", False, False)
    stream = llm.stream(ids, 20, temperature=0)
    next(stream)
    stream.close()  # aborts its request (documented), which must free the engine's rows for generate
    tokens, _ = llm.generate([ids], 4, temperature=0)
    assert tokens[0] == llm.text_completion(["Once upon a time"], max_gen_len=4, temperature=0)[0]["tokens"]


def test_a_reply_that_opens_a_new_turn_has_ended(llm):
    """Special-token text never shows in a reply: the chat template's own special tokens
    (<|im_start|>) stop generation, as its end-of-turn token does."""
    [done] = llm.text_completion(["<|im_start|>user\nHi<|im_end|>\n"], max_gen_len=8, temperature=0)
    assert done["generation"] == "" and done["finish_reason"] == "stop"  # it would open the next turn
    [reply] = llm.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=32, temperature=0)
    assert "<|" not in reply["generation"]["content"]


# --- truncation and early stop, on a scripted model ----------------------------------------------

STOP, PAD = 1, 0


class ScriptedModel(nn.Module):
    """Greedy decoding of this model follows `follow[row]`: it predicts follow[row][p] as the token
    at position p (STOP past the end), whatever the input. Counts forward calls."""

    def __init__(self, follow, vocab=32):
        super().__init__()
        self.params = ModelArgs(dim=1, n_layers=0, n_heads=1, n_kv_heads=1, vocab_size=vocab, hidden_dim=1,
                                max_seq_len=64, max_batch_size=4)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.follow, self.calls = follow, 0

    def forward(self, tokens, start_pos, last_only=False):
        self.calls += 1
        bsz, seqlen = tokens.shape
        positions = [start_pos + seqlen - 1] if last_only else list(range(start_pos, start_pos + seqlen))
        logits = torch.zeros(bsz, len(positions), self.params.vocab_size)
        for b in range(bsz):
            for j, p in enumerate(positions):
                script = self.follow[b]
                logits[b, j, script[p + 1] if p + 1 < len(script) else STOP] = 10.0
        return logits


class ToyTokenizer(Tokenizer):
    bos_id, eos_id, pad_id, n_words, stop_ids, add_bos, chat_template = None, STOP, PAD, 32, frozenset({STOP}), False, None

    def _decode(self, ids):
        return " ".join(map(str, ids))


def scripted(follow):
    model = ScriptedModel(follow)
    return Llama(model, ToyTokenizer(), torch.Generator()), model


def test_max_gen_len_is_respected():
    llm, _ = scripted([[0, 0, 0, 9, 8, 7, 6, 5, 4, 3]])
    tokens, _ = llm.generate([[5, 5, 5]], max_gen_len=4, temperature=0)
    assert tokens == [[9, 8, 7, 6]]


def test_cut_before_the_first_stop_id():
    llm, _ = scripted([[0, 0, 9, 8, STOP, 7, STOP]])
    tokens, _ = llm.generate([[5, 5]], max_gen_len=10, temperature=0)
    assert tokens == [[9, 8]]


def test_a_stop_id_inside_the_prompt_does_not_stop_the_row():
    llm, _ = scripted([[0, 0, 0, 9, 8, STOP]])
    tokens, _ = llm.generate([[5, STOP, 5]], max_gen_len=10, temperature=0)
    assert tokens == [[9, 8]]
    echoed, _ = llm.generate([[5, STOP, 5]], max_gen_len=10, temperature=0, echo=True)
    assert echoed == [[5, STOP, 5, 9, 8]]


def test_prompt_tokens_are_kept_and_rows_are_independent():
    # Row 1's prompt is longer; the model "predicts" 3s over it, which torch.where must overwrite.
    follow = [[0, 9, STOP], [3, 3, 3, 3, 3, 4, 4, 4, 4, STOP]]
    llm, _ = scripted(follow)
    prompts = [[6, 6], [6, 7, 8, 9, 10, 11]]
    tokens, _ = llm.generate(prompts, max_gen_len=8, temperature=0, echo=True)
    assert tokens == [[6, 6], [6, 7, 8, 9, 10, 11, 4, 4, 4]]
    for row in range(2):  # each row equals its prompt run alone
        alone, _ = scripted([follow[row]])[0].generate([prompts[row]], max_gen_len=8, temperature=0, echo=True)
        assert alone[0] == tokens[row]


def test_early_stop_ends_the_loop():
    llm, model = scripted([[0, 0, 9, STOP], [0, 0, 8, 8, STOP]])
    tokens, _ = llm.generate([[5, 5], [5, 5]], max_gen_len=30, temperature=0)
    assert tokens == [[9], [8, 8]]
    assert model.calls == 3  # positions 2, 3 and 4: the last row's stop ends the loop


def test_loop_ends_once_every_row_has_max_gen_len_tokens():
    llm, model = scripted([[0] * 40, [0] * 40])
    llm.generate([[5], [5, 5, 5, 5, 5]], max_gen_len=3, temperature=0)
    assert model.calls == 7  # positions 1..7: the long row's 3 tokens end at position 7


# --- errors ----------------------------------------------------------------------------------------

def test_bad_arguments_are_clear(llm):
    ok = [[1, 2, 3]]
    cases = [
        (lambda: llm.generate([], 8), "non-empty list"),
        (lambda: llm.generate([[]], 8), "prompt 0 is empty"),
        (lambda: llm.generate([[1]] * 9, 8), "9 prompts exceed max_batch_size 8"),
        (lambda: llm.generate(ok, 0), "max_gen_len must be"),
        (lambda: llm.generate(ok, 510), "prompt 0 has 3 tokens.*exceeds max_seq_len 512"),
        (lambda: llm.generate([[49152]], 8), "outside"),
        (lambda: llm.generate(ok, 8, temperature=-1), "temperature"),
        (lambda: llm.generate(ok, 8, top_p=0), "top_p"),
        (lambda: llm.generate(ok, 8, top_p=1.5), "top_p"),
        (lambda: llm.generate(ok, 8, top_k=0), "top_k"),
        (lambda: llm.text_completion([]), "non-empty list"),
        (lambda: llm.text_completion(["fine", 3]), "prompt 1 is a int, not text"),
        (lambda: llm.text_completion(["a", "word " * 600]), "prompt 1 has .* tokens"),
        (lambda: llm.chat_completion([[{"role": "robot", "content": "hi"}]]), "role"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_stream_keeps_sentencepiece_spaces(tmp_path):
    """Decoding one SentencePiece token at a time loses the spaces its pieces carry ("▁the");
    the stream must not."""
    llm = Llama.build(write_tiny_gguf(tmp_path / "spm.gguf", vocab_kind="llama"), max_seq_len=128, device="cpu",
                      dtype="float32", seed=0)
    ids = llm.tokenizer.encode("The history of", bos=True, eos=False)
    for seed in range(3):
        llm.generator.manual_seed(seed)
        pieces = list(llm.stream(ids, 50, temperature=1.0, top_p=1.0))
        llm.generator.manual_seed(seed)
        tokens, _ = llm.generate([ids], 50, temperature=1.0, top_p=1.0)
        text = llm.tokenizer.decode(tokens[0])
        assert "".join(pieces) == text
        assert text.count(" ") > 5  # the random model's pieces do carry spaces
