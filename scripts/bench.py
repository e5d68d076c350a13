"""Side-by-side speed of llama_lite, transformers and llama.cpp on one checkpoint (default: the
SmolLM2-135M-Instruct Q4_1 GGUF), greedy, end-of-sequence ignored, same prompts and thread count.

    python scripts/bench.py                                  # every system that imports
    python scripts/bench.py --systems llama_lite:bfloat16 --n_prompts 32

Each system runs in fresh processes (so its load time and peak memory are its own) and prints
one JSON line per case; the parent prints a table of the ratios issue 8 asks for and the
fraction of the memory-bandwidth ceiling each batch-1 decode reaches. A system whose package is not
installed is skipped with a note (transformers needs `accelerate`; llama.cpp `llama-cpp-python`).

Cases: load (build on a cached file, then the first token), decode_b1 (128 new tokens, one
sequence) with peak RSS after it (a one-row cache), decode_b8 (8 sequences, aggregate tokens/s),
mixed (--n_prompts prompts of 5-300 tokens, 64 new tokens each: llama_lite with continuous
batching over --mixed_batch_size rows, transformers in batches of 8, llama.cpp one by one), and
serving (1, 8 and 32 concurrent streaming clients of an OpenAI-compatible server, 64 tokens each:
llama_lite's scripts/serve.py with --mixed_batch_size rows, llama-cpp-python's `llama_cpp.server`
with --interrupt_requests False, or llama.cpp's own llama-server; aggregate tokens/s, time to first token p50/p99,
streams cut short), and constrained (llama_lite only; structured output over tests/schemas.json: each
schema's compile time, the per-token mask cost p50/p99 replaying sampled outputs, and batch-1 /
batch-8 tok/s of a JSON Schema that cannot end within --new_tokens against the same requests
unconstrained), and spec_grounded / spec_chat / spec_mixed (llama_lite only; speculative decoding off
against "auto" and "ngram" on one model, batch 1 and 8: copying a ~500-token document, free chat
questions, and the 256 mixed prompts on 8 rows: decoding tok/s, speedup, tokens a guessing step).
llama_lite systems are named llama_lite[:DTYPE][:int8|int4][:compile|nocompile]: plain `llama_lite` is
the default configuration (what chat.py and serve.py run without flags). stream_b1 is batch 1 through
the engine (`Llama.stream`, what chat.py and one server client use); startup times a first start
with an empty compiler cache and a second one with it filled: load -> first streamed token, and
when the compiled decode step took over.

`--device cuda --shape smollm2|llama1b` runs random-weight checkpoints of those shapes, written by
transformers into a temporary folder (no weights need to travel), llama_lite against transformers
on the GPU. The table is headed by the CPU's instruction sets (or the GPU's name): figures from
different kinds of machine are not comparable.

Prefix caching, llama_lite alone, its cache on against off in one process (two engines over one
model): prefix_chat (a 10-turn chat with a ~1,000-token system prompt, 32-token replies: time to
first token of each turn) and prefix_shared (64 requests sharing a 1,000-token prefix with 50-token
tails, 16 new tokens each, 16 rows: end to end); each with the hit rate, the index's host memory and
whether the tokens came out the same.
"""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# llama_lite[:DTYPE][:int8|int4][:compile|nocompile]: the dtype of activations (and of weights not kept
# quantized), the levers; plain llama_lite is the default configuration.
ALL_SYSTEMS = ("llama_lite", "llama_lite:nocompile", "llama_lite:float32", "llama_lite:float32:compile",
               "llama_lite:float32:int8:compile", "transformers", "llama_cpp")
CASES = ("load", "decode_b1", "stream_b1", "decode_b8", "mixed", "serving", "startup", "prefix_chat", "prefix_shared", "constrained",
         "spec_grounded", "spec_chat", "spec_mixed")
DTYPES = ("float32", "bfloat16", "float16")
SHAPES = {  # random-weight checkpoints for --device cuda (transformers' LlamaConfig fields)
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True),
    "llama1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
}
PREFIX_CASES, PREFIX_ROWS, PREFIX_SEQ_LEN = ("prefix_chat", "prefix_shared"), 16, 2048
SPEC_CASES, SPEC_ROWS = ("spec_grounded", "spec_chat", "spec_mixed"), 8
GROUNDED_DOCUMENT = (  # ~500 tokens, and tasks over it whose answers repeat it
    "The Riverside Cooperative: annual report\n\n"
    "The Riverside Cooperative ran three projects this year. The first, a community garden on Elm Street, opened in "
    "March with forty plots, a shared tool shed and a rain barrel on every corner. By August every plot was taken, and "
    "twelve families were on the waiting list. The garden gave away about three hundred kilograms of vegetables to the "
    "food bank on Harbor Road, mostly tomatoes, beans and squash.\n\n"
    "The second project, a repair café, met every second Saturday in the basement of the public library. Volunteers "
    "fixed over two hundred items, mostly lamps, bicycles, toasters and small kitchen appliances, and taught visitors "
    "how to replace a fuse, patch a tire and sew on a button. The café kept a notebook of every repair; about four in "
    "five items left the basement working again.\n\n"
    "The third project, a bulk-buying club for dried goods, now serves sixty households. Members order rice, lentils, "
    "oats, flour and coffee once a month, and the club buys them by the sack from two farms in the valley. Members "
    "saved about a fifth on their grocery bills, and the club's delivery van made one trip a month instead of sixty.\n\n"
    "The board thanks the volunteers who made this possible, especially Maria Gonzalez, who coordinated the garden, "
    "Tom Becker, who ran the repair café, and Aisha Rahman, who kept the accounts of the buying club. Next year the "
    "cooperative plans to add a seed library, to open the repair café on Wednesday evenings as well, and to start a "
    "tool lending shelf in the garden shed. The budget for next year is twelve thousand dollars, of which five thousand "
    "go to the garden, four thousand to the café and three thousand to the buying club.\n\n"
    "Members can vote on the budget at the general meeting on the first Monday of June, at seven in the evening, in the "
    "library's main hall. Members who cannot attend may vote by mail; ballots must arrive by the last Friday of May."
)
GROUNDED_TASKS = ("Repeat the following text exactly, word for word:", "Copy the paragraph about the repair café from this report:",
         "Rewrite this report in the present tense:", "Copy the last two paragraphs of this report:",
         "Fix any spelling mistakes in this report and return the whole text:", "Quote the sentences of this report that mention money:",
         "Copy the paragraph about the garden from this report:", "Return this report with every paragraph shortened a little:")
CHAT_QUESTIONS = ("Write a short story about a dragon who learns to cook.", "Why is the sky blue?",
                  "Give me three tips for learning a new language.", "What is the difference between a virus and a bacterium?",
                  "Describe a perfect weekend in the mountains.", "How do I make a good cup of tea?",
                  "Explain how a bicycle stays upright.", "Write a poem about the sea.")
SERVING_CLIENTS = (1, 8, 32)
MAX_SEQ_LEN = 384  # the longest mixed prompt (300) + 64 new tokens fits


def corpus_pieces(tokenizer_encode, n, length, seed=0):
    """n token lists cut from tokenizer/corpus.txt at seeded random places, each length(rng) long."""
    ids = tokenizer_encode((ROOT / "tokenizer" / "corpus.txt").read_text(encoding="utf-8")[:400_000])
    rng = random.Random(seed)
    pieces = []
    for _ in range(n):
        size = length(rng)
        start = rng.randrange(len(ids) - size)
        pieces.append(ids[start : start + size])
    return pieces


def mixed_prompts(tokenizer_encode, n, seed=0):
    """n token lists of 5-300 tokens cut from tokenizer/corpus.txt at seeded random places."""
    return corpus_pieces(tokenizer_encode, n, lambda rng: rng.randint(5, 300), seed)


def peak_rss_mb() -> float:
    """VmHWM, this process's own peak resident set (ru_maxrss would carry a parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


# --- one system per process ------------------------------------------------------------------------

def build_options(options) -> dict:
    """Llama.build's levers from a llama_lite system name's options."""
    return {"dtype": next((o for o in options if o in DTYPES), None),
            "quantize": next((o for o in options if o in ("int8", "int4")), None),
            "compile": True if "compile" in options else False if "nocompile" in options else None}


class LlamaLite:
    def __init__(self, path, options, threads, max_batch_size, max_seq_len=MAX_SEQ_LEN, device="cpu"):
        from llama_lite import Llama

        self.llm = Llama.build(path, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
                               threads=threads, **build_options(options))
        self.stop_ids = self.llm.tokenizer.stop_ids
        self.llm.tokenizer.stop_ids = frozenset({-1})  # no token is -1: end-of-sequence is ignored
        tensors = [*self.llm.model.parameters(), *self.llm.model.buffers()]  # the tied embedding/output counted once:
        self.weight_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors if t.dim() == 2}.values())

    def compiled(self):
        """Wait for a background compile, if any: whether the compiled step runs, and its build seconds."""
        step = self.llm.model.decode_step
        if step is None:
            return {"compiled": False}
        step.wait()
        return {"compiled": step.ready, "compile_s": round(step.seconds or 0.0, 1)}

    def stream(self, prompt, n_new):
        return sum(1 for _ in self.llm.stream(prompt, n_new, temperature=0))

    def encode(self, text):
        return self.llm.tokenizer.encode(text, bos=False, eos=False)

    def generate(self, prompts, n_new):
        tokens, _ = self.llm.generate(prompts, n_new, temperature=0)
        return tokens

    def many(self, prompts, n_new):
        from llama_lite import SamplingParams

        return self.many_params(prompts, SamplingParams(temperature=0, max_tokens=n_new))

    def many_params(self, prompts, params):
        """Every prompt as a request on the engine (continuous batching); seconds of steps that fed
        prompt tokens and of steps that only decoded are kept in self.split."""
        engine = self.llm.engine
        tokens = {engine.add(p, params): [] for p in prompts}
        self.split = {"prefill_steps_s": 0.0, "decode_steps_s": 0.0}
        while engine.has_unfinished():
            feeds_prompts = bool(engine.waiting) or any(not r.decoding for r in engine.running)
            started = time.perf_counter()
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
            self.split["prefill_steps_s" if feeds_prompts else "decode_steps_s"] += time.perf_counter() - started
        return list(tokens.values())


class Transformers:
    def __init__(self, path, options, threads, max_batch_size, device="cpu"):
        import torch
        import transformers

        torch.set_num_threads(threads)
        path = Path(path)
        self.torch, self.device = torch, device
        if path.is_dir():  # a random-weight checkpoint (--shape): bfloat16, as llama_lite's default on a GPU
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
            self.tokenizer = transformers.LlamaTokenizer(str(path / "tokenizer.model"))
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                           dtype=torch.float32).to(device).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.batch = 8 if device == "cpu" else 64

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompts, n_new):
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id or 0
        ids = self.torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # left padding
        mask = self.torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                      do_sample=False, pad_token_id=pad)
        return [row[width:] for row in out.tolist()]

    def many(self, prompts, n_new):
        out = []
        for start in range(0, len(prompts), self.batch):
            out += self.generate(prompts[start : start + self.batch], n_new)
        return out


class LlamaCpp:
    def __init__(self, path, options, threads, max_batch_size, device="cpu"):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=MAX_SEQ_LEN, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                   verbose=False)
        self.weight_bytes = Path(path).stat().st_size
        self.batch = 1

    def encode(self, text):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def generate(self, prompts, n_new):
        out = []
        for prompt in prompts:  # llama-cpp-python runs one sequence at a time
            tokens = []
            for token in self.llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # never stops by itself
                tokens.append(token)
                if len(tokens) == n_new:
                    break
            out.append(tokens)
        return out

    many = generate

    def stream(self, prompt, n_new):
        return len(self.generate([prompt], n_new)[0])


SYSTEMS = {"llama_lite": LlamaLite, "transformers": Transformers, "llama_cpp": LlamaCpp}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def constrained(runner, prompt, new_tokens):
    """Structured output's costs on llama_lite: compile (schema -> matcher), the mask per token, and
    tok/s with and without a constraint (batch 1 and 8, greedy)."""
    import numpy as np

    from llama_lite import SamplingParams, constraints

    llm, engine = runner.llm, runner.llm.engine
    llm.tokenizer.stop_ids = runner.stop_ids  # the grammar allows them only where the text may end
    schemas = json.loads((ROOT / "tests" / "schemas.json").read_text())
    started = time.perf_counter()
    engine.grammars.matcher(SamplingParams(json_object=True))  # the vocabulary as llguidance sees it, built once
    vocabulary_s = time.perf_counter() - started
    compile_ms, outputs = [], []
    for schema in schemas:
        constraints._compile.cache_clear()
        engine.grammars._compiled.clear()
        started = time.perf_counter()
        params = SamplingParams(temperature=1.0, top_p=1.0, seed=len(outputs), max_tokens=96, json_schema=schema)
        engine.grammars.matcher(params)
        compile_ms.append(1e3 * (time.perf_counter() - started))
        outputs.append((params, runner.many_params([prompt], params)[0]))
    mask_us = []
    words = np.zeros((engine.model.params.vocab_size + 31) // 32, dtype=np.int32)
    for params, tokens in outputs:  # replay each sampled text: the mask before each of its tokens
        matcher = engine.grammars.matcher(params)
        for token in tokens:
            started = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            mask_us.append(1e6 * (time.perf_counter() - started))
            matcher.consume_token(token)
    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
              "required": ["name", "age", "city"]}
    endless = {"type": "array", "minItems": 100, "items": person}  # cannot end within new_tokens: every row runs to the end
    speeds = {}
    for bsz in (1, 8):
        for _ in range(2):  # free and constrained in turn, twice: the better of each (a shared machine is noisy)
            for name, extra in (("free", {}), ("json", {"json_schema": endless})):
                params = SamplingParams(temperature=0, max_tokens=new_tokens, **extra)
                runner.many_params([prompt] * bsz, SamplingParams(temperature=0, max_tokens=4, **extra))  # warm up
                started = time.perf_counter()
                out = runner.many_params([prompt] * bsz, params)
                assert all(len(row) == new_tokens for row in out)
                key = f"b{bsz}_{name}_tok_s"
                speeds[key] = max(speeds.get(key, 0), round(bsz * new_tokens / (time.perf_counter() - started), 1))
    llm.tokenizer.stop_ids = frozenset({-1})
    return dict(schemas=len(schemas), vocabulary_s=round(vocabulary_s, 2), compile_ms_p50=round(percentile(compile_ms, 0.5), 2),
                compile_ms_max=round(max(compile_ms), 2), mask_us_p50=round(percentile(mask_us, 0.5)),
                mask_us_p99=round(percentile(mask_us, 0.99)), masked_tokens=len(mask_us), **speeds)


def worker(system, checkpoint, threads, cases, n_prompts, new_tokens, max_batch_size, device="cpu"):
    """Run the cases for one system in this process; a JSON line each on stdout."""
    name, *options = system.split(":")

    def emit(case, **values):
        print(json.dumps({"system": system, "case": case, **values}), flush=True)

    started = time.perf_counter()
    if "startup" in cases:  # as a chat starts: build, then the first token of a streamed reply
        runner = SYSTEMS[name](checkpoint, options, threads, max_batch_size, device=device)
        first = next(iter(runner.llm.stream(runner.encode("The history of the city of Rome begins"), 8, temperature=0)))
        assert first
        first_token_s = time.perf_counter() - started
        compiled = runner.compiled()
        emit("startup", first_token_s=round(first_token_s, 2), compiled_after_s=round(time.perf_counter() - started, 1),
             cache=os.environ.get("LLAMA_LITE_BENCH_CACHE", "as it is"), **compiled)
        return
    long_context = {"max_seq_len": PREFIX_SEQ_LEN} if set(cases) & {*PREFIX_CASES, *SPEC_CASES} else {}
    runner = SYSTEMS[name](checkpoint, options, threads, max_batch_size, device=device, **long_context)
    prompt = runner.encode("The history of the city of Rome begins")
    first = runner.generate([prompt], 1)
    assert len(first[0]) == 1
    if "load" in cases:
        emit("load", seconds=round(time.perf_counter() - started, 3), **(runner.compiled() if name == "llama_lite" else {}))
    elif name == "llama_lite":
        runner.compiled()  # the compiled step, where there is one, is what the cases measure
    for case, bsz in (("decode_b1", 1), ("stream_b1", 1), ("decode_b8", 8)):
        if case in cases and (case != "stream_b1" or hasattr(runner, "stream")):
            run = (lambda n: [[0] * runner.stream(prompt, n)]) if case == "stream_b1" else (lambda n: runner.generate([prompt] * bsz, n))
            run(8)  # warm up
            started = time.perf_counter()
            out = run(new_tokens)
            seconds = time.perf_counter() - started
            assert all(len(row) == new_tokens for row in out)
            extra = {"peak_rss_mb": round(peak_rss_mb())} if case == "decode_b1" else {}
            emit(case, tok_s=round(bsz * new_tokens / seconds, 1), seconds=round(seconds, 2),
                 weight_mb=round(runner.weight_bytes / 1e6), **extra)
    if "mixed" in cases:
        prompts = mixed_prompts(runner.encode, n_prompts)
        runner.many(prompts[:2], 2)  # warm up
        started = time.perf_counter()
        out = runner.many(prompts, 64)
        seconds = time.perf_counter() - started
        assert len(out) == n_prompts and all(len(row) == 64 for row in out)
        split = {k: round(v, 1) for k, v in getattr(runner, "split", {}).items()}
        emit("mixed", seconds=round(seconds, 1), prompts=n_prompts, prompt_tokens=sum(map(len, prompts)),
             tok_s=round(64 * n_prompts / seconds, 1), batch=getattr(runner, "batch", max_batch_size),
             peak_rss_mb=round(peak_rss_mb()), **split)
    if "prefix_chat" in cases:
        emit("prefix_chat", **prefix_chat(runner.llm))
    if "prefix_shared" in cases:
        emit("prefix_shared", **prefix_shared(runner.llm))
    if "constrained" in cases and name == "llama_lite":
        chat = runner.llm.chat_prompt_tokens([{"role": "user", "content": "List people as JSON."}])
        emit("constrained", **constrained(runner, chat, new_tokens))
    for case in (c for c in SPEC_CASES if c in cases):
        emit(case, **speculation(runner.llm, case, n_prompts, new_tokens))


# --- prefix caching: the cache on against off, on one model -----------------------------------------

def engines(llm):
    """{True: an engine with the prefix cache, False: one without}, over llm's model and KV cache."""
    from llama_lite.engine.engine import Engine

    return {on: Engine(llm.model, llm.tokenizer, llm.generator, prefix_cache=on) for on in (True, False)}


def finish(engine, prompts, max_tokens):
    """Greedy requests run to the end: per prompt (new ids, seconds to its first token)."""
    from llama_lite import SamplingParams

    started = time.perf_counter()
    rids = [engine.add(p, SamplingParams(temperature=0, max_tokens=max_tokens)) for p in prompts]
    ids, first = {rid: [] for rid in rids}, {}
    while engine.has_unfinished():
        for out in engine.step():
            ids[out.request_id] += out.token_ids
            first.setdefault(out.request_id, time.perf_counter() - started)
    return [(ids[rid], first[rid]) for rid in rids]


def cache_figures(prefix, prompts):
    """Hit rate (requests and prompt tokens) and the host memory of the prefix index."""
    import sys as system

    nodes = [tree.root for tree in prefix.trees.values()]
    index = 0
    while nodes:
        node = nodes.pop()
        index += sum(system.getsizeof(x) for x in (node, node.ids, node.children, node.rows))
        nodes += node.children.values()
    index += sum(system.getsizeof(prompt) for _, prompt in prefix.prompt_of.values())
    return {"hit_rate": round(prefix.hits / max(1, prefix.hits + prefix.misses), 3),
            "reused_of_prompt_tokens": round(prefix.reused_tokens / sum(map(len, prompts)), 3), "index_kb": round(index / 1024)}


def prefix_chat(llm, turns=10, system_tokens=1000, reply_tokens=32):
    """A chat of `turns` turns after a ~system_tokens system prompt, one turn at a time (as chat.py):
    time to first token of turn 1 and of the last, the cache on and off."""
    [system] = corpus_pieces(lambda text: llm.tokenizer.encode(text, bos=False, eos=False), 1, lambda _: system_tokens, seed=1)
    questions = [f"Question {k + 1}: in one sentence, what does the text above say about topic number {k + 1}?"
                 for k in range(turns)]
    figures, replies = {}, {}
    both = engines(llm)
    finish(both[False], [llm.chat_prompt_tokens([{"role": "system", "content": llm.tokenizer.decode(system)}])], 1)  # warm up
    for on, engine in both.items():
        dialog, prompts, replies[on], ttft = [{"role": "system", "content": llm.tokenizer.decode(system)}], [], [], []
        for question in questions:
            dialog.append({"role": "user", "content": question})
            prompts.append(llm.chat_prompt_tokens(dialog))
            [(ids, first)] = finish(engine, prompts[-1:], reply_tokens)
            dialog.append({"role": "assistant", "content": llm.tokenizer.decode(ids)})
            replies[on].append(ids)
            ttft.append(first)
        name = "on" if on else "off"
        figures.update({f"ttft_turn1_{name}_s": round(ttft[0], 2), f"ttft_turn{turns}_{name}_s": round(ttft[-1], 2),
                        f"ttft_all_{name}_s": round(sum(ttft), 1)})
        if on:
            figures.update(cache_figures(engine.prefix, prompts))
    return {**figures, "prompt_tokens_first_last": [len(prompts[0]), len(prompts[-1])], "same_tokens": replies[True] == replies[False]}


def prefix_shared(llm, n=64, prefix_tokens=1000, tail_tokens=50, new_tokens=16):
    """n requests sharing a prefix_tokens beginning, each with its own tail_tokens, all added at
    once: seconds end to end, the cache on and off."""
    def encode(text):
        return llm.tokenizer.encode(text, bos=False, eos=False)

    [prefix] = corpus_pieces(encode, 1, lambda _: prefix_tokens, seed=2)
    prompts = [prefix + tail for tail in corpus_pieces(encode, n, lambda _: tail_tokens, seed=3)]
    figures, results = {}, {}
    both = engines(llm)
    finish(both[False], prompts[:1], 1)  # warm up
    for on, engine in both.items():
        started = time.perf_counter()
        results[on] = [ids for ids, _ in finish(engine, prompts, new_tokens)]
        figures["seconds_on" if on else "seconds_off"] = round(time.perf_counter() - started, 1)
        if on:
            figures.update(cache_figures(engine.prefix, prompts))
    return {**figures, "speedup": round(figures["seconds_off"] / figures["seconds_on"], 1), "rows": llm.model.params.max_batch_size,
            "same_tokens": results[True] == results[False]}


# --- speculative decoding: on ("auto") against off, on one model --------------------------------------

def speculation(llm, case, n_prompts, new_tokens):
    """Batch 1 and batch 8 of a task, speculation off, "auto" (the default) and "ngram" (every request
    guesses): decoding tok/s (new tokens after each batch's first, over the seconds after it: the
    prefill is the same either way), the speedups, the tokens a guessing request got per step,
    whether the tokens came out the same. spec_grounded: copy, rewrite or quote a ~500-token report (input-grounded);
    spec_chat: free chat questions (both: the modes take turns twice, each keeping its best);
    spec_mixed: the n_prompts mixed prompts on SPEC_ROWS rows, 64 new tokens each (off and auto, once)."""
    from llama_lite.engine.engine import Engine
    from llama_lite.engine.speculation import Acceptance

    def encode(text):
        return llm.tokenizer.encode(text, bos=False, eos=False)

    def chat(text):
        return llm.chat_prompt_tokens([{"role": "user", "content": text}])

    if case == "spec_grounded":
        prompts = [chat(task + "\n\n" + GROUNDED_DOCUMENT) for task in GROUNDED_TASKS]
        batches = {1: prompts[:1], 8: prompts}
    elif case == "spec_chat":
        prompts = [chat(q) for q in CHAT_QUESTIONS]
        batches = {1: prompts[:1], 8: prompts}
    else:
        batches, new_tokens = {SPEC_ROWS: mixed_prompts(encode, n_prompts)}, 64
    modes = ("off", "auto") if case == "spec_mixed" else ("off", "auto", "ngram")
    engines = {mode: Engine(llm.model, llm.tokenizer, llm.generator, speculative=mode) for mode in modes}
    finish(engines["off"], [chat("Hi")], 4)  # warm up
    figures = {}
    rounds = 1 if case == "spec_mixed" else 2  # the modes take turns; each keeps its best round
    for bsz, prompts in batches.items():
        tokens = {}
        for mode, engine in [*engines.items()] * rounds:
            engine.acceptance = Acceptance()
            started = time.perf_counter()
            results = finish(engine, prompts, new_tokens)
            after_first = time.perf_counter() - started - min(first for _, first in results)
            tokens[mode] = [ids for ids, _ in results]
            tok_s = round((sum(map(len, tokens[mode])) - len(prompts)) / after_first, 1)
            figures[f"b{bsz}_{mode}_tok_s"] = max(tok_s, figures.get(f"b{bsz}_{mode}_tok_s", 0))
            if mode != "off":
                figures[f"b{bsz}_{mode}_speedup"] = round(figures[f"b{bsz}_{mode}_tok_s"] / figures[f"b{bsz}_off_tok_s"], 2)
                figures[f"b{bsz}_{mode}_tokens_per_step"] = round(engine.acceptance.tokens_per_step, 2)
        figures[f"b{bsz}_same_tokens"] = all(tokens[mode] == tokens["off"] for mode in modes)
    return figures


# --- serving: a server in a subprocess, streaming clients in threads -------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(system, checkpoint, threads, rows):
    """(process, base URL, model name) of `system`'s OpenAI-compatible server, once it answers."""
    import httpx

    name, _, rest = system.partition(":")
    port = free_port()
    if name == "llama_lite":
        levers = build_options(rest.split(":"))
        cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), f"--checkpoint={checkpoint}", f"--port={port}",
               f"--max_batch_size={rows}", f"--max_seq_len={MAX_SEQ_LEN}", f"--max_queue={4 * rows}"]
        cmd += [f"--dtype={levers['dtype']}"] if levers["dtype"] else []
        cmd += [f"--quantize={levers['quantize']}"] if levers["quantize"] else []
        cmd += {True: ["--compile"], False: ["--nocompile"], None: []}[levers["compile"]]
        model = Path(checkpoint).stem
    elif name == "llama_server":  # llama.cpp's own server, continuous batching over 8 slots (as its users run it)
        cmd = [rest, "-m", checkpoint, "--port", str(port), "-np", "8", "-cb", "-t", str(threads), "-c", str(8 * MAX_SEQ_LEN)]
        model = checkpoint
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", checkpoint, "--port", str(port), "--n_ctx", str(MAX_SEQ_LEN),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--interrupt_requests", "False"]
        model = checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            health = httpx.get(url + "/health", timeout=1)
            # llama_lite's server answers before its compiled step is built: the bench measures what follows
            if health.status_code == 200 and health.json().get("decode_step") != "compiling":
                return proc, url, model
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{system}'s server did not start")


def stream_clients(url, model, n_clients, max_tokens=64):
    """n_clients streaming completions at once: aggregate tokens/s, time-to-first-token p50/p99 and
    how many streams ended without a finish reason (cut short)."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(i):
        body = {"model": model, "prompt": f"Once upon a time, in the city of number {i}, there lived", "max_tokens": max_tokens,
                "temperature": 0, "stream": True}
        started, first, tokens, reason = time.perf_counter(), None, 0, None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as reply:
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text"):
                    first = first or time.perf_counter()
                    tokens += 1
                reason = choice.get("finish_reason") or reason
        return started, first, time.perf_counter(), tokens, reason

    with ThreadPoolExecutor(n_clients) as pool:
        runs = list(pool.map(one, range(n_clients)))
    ttft = sorted((first or end) - start for start, first, end, _, _ in runs)
    span = max(end for _, _, end, _, _ in runs) - min(start for start, *_ in runs)
    return {"clients": n_clients, "tok_s": round(sum(r[3] for r in runs) / span, 1),
            "ttft_p50_s": round(statistics.median(ttft), 2), "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 2),
            "cut_short": sum(1 for r in runs if r[4] is None)}


def serving(system, checkpoint, threads, rows):
    proc, url, model = start_server(system, checkpoint, threads, rows)
    try:
        stream_clients(url, model, 1, max_tokens=4)  # warm up
        for n in SERVING_CLIENTS:
            row = {"system": system, "case": "serving", **stream_clients(url, model, n)}
            print(json.dumps(row), flush=True)
            yield row
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# --- the parent: run each system, print the table --------------------------------------------------

def importable(name) -> bool:
    module = {"llama_lite": "llama_lite", "transformers": "accelerate", "llama_cpp": "llama_cpp",
              "llama_cpp_server": "llama_cpp.server.app"}[name]
    found = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return found.returncode == 0 and (name != "transformers" or subprocess.run(
        [sys.executable, "-c", "import transformers"], capture_output=True).returncode == 0)


def table(rows, bandwidth_gbs):
    """The speed table, each batch-1 decode against the bandwidth ceiling, and the targets' ratios."""
    get = {(r["system"], r["case"]): r for r in rows}
    measured = ("load", "decode_b1", "stream_b1", "decode_b8", "mixed")
    systems = sorted({r["system"] for r in rows if r["case"] in measured},
                     key=lambda s: ALL_SYSTEMS.index(s) if s in ALL_SYSTEMS else 99)
    lines = ["| system | load -> first token (s) | batch-1 tok/s (generate / engine) | of ceiling | batch-8 tok/s | "
             "mixed: s (rows) | peak RSS b1 (MB) |", "|---|---|---|---|---|---|---|"] if systems else []
    for s in systems:
        b1, stream, b8, mixed, load = (get.get((s, c), {}) for c in measured[1:] + ("load",))
        of_ceiling = "-"
        if b1:
            ceiling = bandwidth_gbs * 1e9 / (b1["weight_mb"] * 1e6)  # tok/s if every weight byte streams at that rate
            of_ceiling = f"{b1['tok_s'] / ceiling:.0%} of {ceiling:.0f}"
        lines.append(f"| {s} | {load.get('seconds', '-')} | {b1.get('tok_s', '-')} / {stream.get('tok_s', '-')} | {of_ceiling} | "
                     f"{b8.get('tok_s', '-')} | {mixed.get('seconds', '-')} ({mixed.get('batch', '-')}) | {b1.get('peak_rss_mb', '-')} |")
    for r in rows:
        if r["case"] == "startup":
            lines.append(f"{r['system']} startup, {r['cache']} compiler cache: first streamed token after {r['first_token_s']} s, "
                         f"compiled step running after {r['compiled_after_s']} s (compiled: {r['compiled']})")

    def ratio(a, case_a, b, case_b, key="tok_s", inverse=False):
        x, y = get.get((a, case_a), {}).get(key), get.get((b, case_b), {}).get(key)
        if not x or not y:
            return "-"
        return f"{(y / x if inverse else x / y):.2f}x"

    for r in rows:
        if r["case"] == "prefix_chat":
            lines.append(f"{r['system']} prefix_chat: time to first token, turn 1 / turn 10: cache on {r['ttft_turn1_on_s']} / "
                         f"{r['ttft_turn10_on_s']} s, off {r['ttft_turn1_off_s']} / {r['ttft_turn10_off_s']} s "
                         f"(target: turn 10 within 1.5x of turn 1 with the cache); hit rate {r['hit_rate']}, "
                         f"same tokens {r['same_tokens']}")
        if r["case"] == "prefix_shared":
            lines.append(f"{r['system']} prefix_shared: {r['seconds_on']} s with the cache, {r['seconds_off']} s without: "
                         f"{r['speedup']}x (target >= 4x); hit rate {r['hit_rate']}, same tokens {r['same_tokens']}")
    for r in (r for r in rows if r["case"] in SPEC_CASES):
        for b in sorted({int(k[1:].split("_")[0]) for k in r if k.endswith("_same_tokens")}):
            modes = [m for m in ("auto", "ngram") if f"b{b}_{m}_tok_s" in r]
            lines.append(f"{r['system']} {r['case']} batch {b}: off {r[f'b{b}_off_tok_s']} tok/s; " + "; ".join(
                f"{m} {r[f'b{b}_{m}_tok_s']} ({r[f'b{b}_{m}_speedup']}x, {r[f'b{b}_{m}_tokens_per_step']} tokens a guessing step)"
                for m in modes) + f"; same tokens {r[f'b{b}_same_tokens']}")
    for r in (r for r in rows if r["case"] == "constrained"):
        lines.append(f"{r['system']} constrained: batch-1 {r['b1_json_tok_s']} vs {r['b1_free_tok_s']} tok/s free "
                     f"({r['b1_json_tok_s'] / r['b1_free_tok_s']:.2f}x), batch-8 {r['b8_json_tok_s']} vs {r['b8_free_tok_s']} "
                     f"({r['b8_json_tok_s'] / r['b8_free_tok_s']:.2f}x) (target >= 0.9x); mask per token p50 {r['mask_us_p50']} us, "
                     f"p99 {r['mask_us_p99']} us ({r['masked_tokens']} tokens); compile p50 {r['compile_ms_p50']} ms, "
                     f"max {r['compile_ms_max']} ms over {r['schemas']} schemas; vocabulary {r['vocabulary_s']} s once")
    served = [r for r in rows if r["case"] == "serving"]
    if served:
        lines += ["", "| system | clients | tok/s | first token p50 (s) | p99 (s) | streams cut short |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['clients']} | {r['tok_s']} | {r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['cut_short']} |"
                  for r in served]
    lines.append("")
    for lite in (s for s in systems if s.startswith("llama_lite")):
        lines += [
            f"{lite}: batch-1 vs llama.cpp: generate {ratio(lite, 'decode_b1', 'llama_cpp', 'decode_b1')}, engine "
            f"{ratio(lite, 'stream_b1', 'llama_cpp', 'decode_b1')} (targets: default >= 1.0x, best >= 1.3x), "
            f"vs transformers {ratio(lite, 'decode_b1', 'transformers', 'decode_b1')}",
            f"{lite}: batch-8 vs transformers batch-8 {ratio(lite, 'decode_b8', 'transformers', 'decode_b8')} (target >= 3.5x), "
            f"vs llama.cpp batch-1 {ratio(lite, 'decode_b8', 'llama_cpp', 'decode_b1')}",
            f"{lite}: mixed prompts vs transformers {ratio(lite, 'mixed', 'transformers', 'mixed', 'seconds', inverse=True)}, "
            f"vs llama.cpp {ratio(lite, 'mixed', 'llama_cpp', 'mixed', 'seconds', inverse=True)}",
        ]
    return "\n".join(lines)


def machine(device) -> str:
    """What the figures were measured on: the GPU's name, or the CPU's model and the instruction sets
    that choose its kernels (AVX2 only, AVX-512, AVX512-BF16, AMX)."""
    if device.startswith("cuda"):
        import torch

        return f"GPU {torch.cuda.get_device_name(device)}"
    model, flags = "unknown CPU", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    sets = [name for name in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if name in flags]
    return f"{len(os.sched_getaffinity(0))} cores of {model}, {' '.join(sets) or 'no AVX2'}"


def random_checkpoint(shape, folder: Path) -> str:
    """A random-weight Hugging Face checkpoint of `shape` (SHAPES), with the project's small
    SentencePiece tokenizer (fewer tokens than the model: only speed is measured)."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rope_theta=10000.0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    shutil.copy(ROOT / "tokenizer" / "llama_lite_sp.model", folder / "tokenizer.model")
    return str(folder)


def run_worker(system, checkpoint, threads, cases, rows_in_cache, device, n_prompts, new_tokens, env=()):
    """One system's cases in a fresh process: its JSON rows."""
    print(f"running {system}: {', '.join(cases)} ({threads} threads)...", file=sys.stderr)
    cmd = [sys.executable, __file__, f"--worker_for={system}", f"--checkpoint={checkpoint}", f"--threads={threads}",
           f"--cases={','.join(cases)}", f"--n_prompts={n_prompts}", f"--new_tokens={new_tokens}",
           f"--max_batch_size={rows_in_cache}", f"--device={device}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", **dict(env)}
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        print(json.dumps(row), flush=True)
    if done.returncode:
        print(f"note: {system} failed (exit {done.returncode}); its rows are missing", file=sys.stderr)
    return rows


def startup(system, checkpoint, threads, device):
    """Two starts of `system`: with an empty compiler cache, then with the one the first filled."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="llama_lite_bench_") as cache:
        for state in ("cold", "warm"):
            env = {"TORCHINDUCTOR_CACHE_DIR": cache, "LLAMA_LITE_BENCH_CACHE": state}
            rows += run_worker(system, checkpoint, threads, ["startup"], 1, device, 1, 8, env)
    return rows


def main(systems=",".join(ALL_SYSTEMS), checkpoint=None, threads=None, cases=",".join(CASES), n_prompts=256,
         new_tokens=128, mixed_batch_size=64, bandwidth_gbs=20.0, worker_for=None, max_batch_size=1, device="cpu",
         shape=None, llama_server=None):
    """Benchmark SYSTEMS (comma-separated; see ALL_SYSTEMS) and print a JSON line per case and a table.

    Each system runs in fresh processes: load and batch-1 decode with a one-row cache (so peak RSS
    is batch 1's), then batch-8 decode and the mixed prompts with --mixed_batch_size rows
    (llama_lite's continuous batching; transformers uses batches of 8), then (llama_lite) the
    constrained case with 8 rows.
    --shape smollm2|llama1b: a random-weight checkpoint of that shape instead (for --device cuda).
    --llama_server PATH: llama.cpp's own server for the serving case (else `llama-server` on PATH).
    """
    threads = threads or len(os.sched_getaffinity(0))
    cases = tuple(cases.split(",")) if isinstance(cases, str) else tuple(cases)
    if worker_for:
        return worker(worker_for, checkpoint, threads, cases, n_prompts, new_tokens, max_batch_size, device)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="llama_lite_shape_") as folder:
        if shape is not None:
            checkpoint = random_checkpoint(shape, Path(folder))
        elif checkpoint is None:
            from llama_lite.loading.download import default_checkpoint

            checkpoint = str(default_checkpoint())
        systems = systems.split(",") if isinstance(systems, str) else list(systems)
        if shape is not None:  # no GGUF for llama.cpp
            systems = [s for s in systems if not s.startswith("llama_cpp")]
        rows = run_all(systems, checkpoint, threads, cases, n_prompts, new_tokens, mixed_batch_size, device, llama_server)
    print(f"\n{machine(device)}; torch threads {threads}\n")
    print(table(rows, bandwidth_gbs))


def run_all(systems, checkpoint, threads, cases, n_prompts, new_tokens, mixed_batch_size, device, llama_server):
    phases = [(("load", "decode_b1", "stream_b1"), 1), (("decode_b8", "mixed"), max(8, mixed_batch_size)),
              (PREFIX_CASES, PREFIX_ROWS), (("constrained",), 8), (SPEC_CASES, SPEC_ROWS)]
    rows = []
    for system in systems:
        name = system.partition(":")[0]
        if not importable(name):
            print(f"note: skipping {system}: its package is not installed", file=sys.stderr)
            continue
        for phase_cases, rows_in_cache in phases:
            wanted = [c for c in phase_cases if c in cases]
            if phase_cases in (PREFIX_CASES, SPEC_CASES) and name != "llama_lite":
                wanted = []  # the prefix and speculation cases measure llama_lite's own levers
            if wanted:
                rows += run_worker(system, checkpoint, threads, wanted, rows_in_cache, device, n_prompts, new_tokens)
        if "startup" in cases and name == "llama_lite":
            rows += startup(system, checkpoint, threads, device)
        if "serving" in cases and name in ("llama_lite", "llama_cpp"):
            if name == "llama_cpp":
                server = llama_server or shutil_which("llama-server")
                if server is None:
                    print("note: skipping llama.cpp serving: no llama-server (pass --llama_server PATH)", file=sys.stderr)
                    continue
                system = f"llama_server:{server}"
            print(f"running {system}: serving ({threads} threads)...", file=sys.stderr)
            rows += list(serving(system, checkpoint, threads, mixed_batch_size))
    return rows


def shutil_which(command):
    import shutil

    return shutil.which(command)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
