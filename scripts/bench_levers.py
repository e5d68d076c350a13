"""llama_lite's own levers, each on against off in one process over one model: prefix caching
(prefix_chat, prefix_shared) and speculative decoding (spec_grounded, spec_chat, spec_mixed)."""

import time

from bench_prompts import CHAT_QUESTIONS, GROUNDED_DOCUMENT, GROUNDED_TASKS, corpus_pieces, mixed_prompts

PREFIX_CASES, PREFIX_ROWS, PREFIX_SEQ_LEN = ("prefix_chat", "prefix_shared"), 16, 2048
SPEC_CASES, SPEC_ROWS = ("spec_grounded", "spec_chat", "spec_mixed"), 8


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
    return {**figures, "prompt_tokens_first_last": [len(prompts[0]), len(prompts[-1])],
            "same_tokens": replies[True] == replies[False]}


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
    return {**figures, "speedup": round(figures["seconds_off"] / figures["seconds_on"], 1),
            "rows": llm.model.params.max_batch_size, "same_tokens": results[True] == results[False]}


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
    by_mode = {mode: Engine(llm.model, llm.tokenizer, llm.generator, speculative=mode) for mode in modes}
    finish(by_mode["off"], [chat("Hi")], 4)  # warm up
    figures = {}
    rounds = 1 if case == "spec_mixed" else 2  # the modes take turns; each keeps its best round
    for bsz, prompts in batches.items():
        tokens = {}
        for mode, engine in [*by_mode.items()] * rounds:
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

