"""The cases of one system, run in this (fresh) process: load, decode_b1, stream_b1, decode_b8,
mixed, constrained, startup, and llama_lite's levers (bench_levers); a JSON line each on stdout."""

import json
import os
import time

from bench_levers import PREFIX_CASES, PREFIX_SEQ_LEN, SPEC_CASES, prefix_chat, prefix_shared, speculation
from bench_prompts import mixed_prompts
from bench_systems import ROOT, SYSTEMS

PROMPT = "The history of the city of Rome begins"  # what load, decode and startup continue


def peak_rss_mb() -> float:
    """VmHWM, this process's own peak resident set (ru_maxrss would carry a parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def worker(system, checkpoint, threads, cases, n_prompts, new_tokens, max_batch_size, device="cpu"):
    """Run the cases for one system in this process; a JSON line each on stdout."""
    name, *options = system.split(":")

    def emit(case, **values):
        print(json.dumps({"system": system, "case": case, **values}), flush=True)

    started = time.perf_counter()
    if "startup" in cases:  # as a chat starts: build, then the first token of a streamed reply
        runner = SYSTEMS[name](checkpoint, options, threads, max_batch_size, device=device)
        emit("startup", **first_start(runner, started))
        return
    long_context = {"max_seq_len": PREFIX_SEQ_LEN} if set(cases) & {*PREFIX_CASES, *SPEC_CASES} else {}
    runner = SYSTEMS[name](checkpoint, options, threads, max_batch_size, device=device, **long_context)
    prompt = runner.encode(PROMPT)
    first = runner.generate([prompt], 1)
    assert len(first[0]) == 1
    if "load" in cases:
        emit("load", seconds=round(time.perf_counter() - started, 3), **(runner.compiled() if name == "llama_lite" else {}))
    elif name == "llama_lite":
        runner.compiled()  # the compiled step, where there is one, is what the cases measure
    for case, bsz in (("decode_b1", 1), ("stream_b1", 1), ("decode_b8", 8)):
        if case in cases and (case != "stream_b1" or hasattr(runner, "stream")):
            emit(case, **decode(runner, case, bsz, prompt, new_tokens))
    if "mixed" in cases:
        emit("mixed", **mixed(runner, n_prompts, max_batch_size))
    if "prefix_chat" in cases:
        emit("prefix_chat", **prefix_chat(runner.llm))
    if "prefix_shared" in cases:
        emit("prefix_shared", **prefix_shared(runner.llm))
    if "constrained" in cases and name == "llama_lite":
        chat = runner.llm.chat_prompt_tokens([{"role": "user", "content": "List people as JSON."}])
        emit("constrained", **constrained(runner, chat, new_tokens))
    for case in (c for c in SPEC_CASES if c in cases):
        emit(case, **speculation(runner.llm, case, n_prompts, new_tokens))


def first_start(runner, started):
    """startup: seconds from `started` (before the build) to the first streamed token, and to the
    compiled step running."""
    first = next(iter(runner.llm.stream(runner.encode(PROMPT), 8, temperature=0)))
    assert first
    first_token_s = time.perf_counter() - started
    compiled = runner.compiled()
    return dict(first_token_s=round(first_token_s, 2), compiled_after_s=round(time.perf_counter() - started, 1),
                cache=os.environ.get("LLAMA_LITE_BENCH_CACHE", "as it is"), **compiled)


def decode(runner, case, bsz, prompt, new_tokens):
    """decode_b1 / decode_b8 (`generate`, bsz copies of the prompt) or stream_b1 (batch 1 through
    the engine): tok/s of new_tokens after a warm-up."""
    def run(n):
        return [[0] * runner.stream(prompt, n)] if case == "stream_b1" else runner.generate([prompt] * bsz, n)

    run(8)  # warm up
    started = time.perf_counter()
    out = run(new_tokens)
    seconds = time.perf_counter() - started
    assert all(len(row) == new_tokens for row in out)
    extra = {"peak_rss_mb": round(peak_rss_mb())} if case == "decode_b1" else {}
    return dict(tok_s=round(bsz * new_tokens / seconds, 1), seconds=round(seconds, 2),
                weight_mb=round(runner.weight_bytes / 1e6), **extra)


def mixed(runner, n_prompts, max_batch_size):
    """n_prompts mixed prompts, 64 new tokens each, all handed over at once: seconds end to end."""
    prompts = mixed_prompts(runner.encode, n_prompts)
    runner.many(prompts[:2], 2)  # warm up
    started = time.perf_counter()
    out = runner.many(prompts, 64)
    seconds = time.perf_counter() - started
    assert len(out) == n_prompts and all(len(row) == 64 for row in out)
    split = {k: round(v, 1) for k, v in getattr(runner, "split", {}).items()}
    return dict(seconds=round(seconds, 1), prompts=n_prompts, prompt_tokens=sum(map(len, prompts)),
                tok_s=round(64 * n_prompts / seconds, 1), batch=getattr(runner, "batch", max_batch_size),
                peak_rss_mb=round(peak_rss_mb()), **split)


def constrained(runner, prompt, new_tokens):
    """Structured output's costs on llama_lite: compile (schema -> matcher), the mask per token, and
    tok/s with and without a constraint (batch 1 and 8, greedy)."""
    import numpy as np

    from llama_lite import SamplingParams
    from llama_lite.engine import constraints

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
    speeds = constrained_speeds(runner, prompt, new_tokens)
    llm.tokenizer.stop_ids = frozenset({-1})
    return dict(schemas=len(schemas), vocabulary_s=round(vocabulary_s, 2), compile_ms_p50=round(percentile(compile_ms, 0.5), 2),
                compile_ms_max=round(max(compile_ms), 2), mask_us_p50=round(percentile(mask_us, 0.5)),
                mask_us_p99=round(percentile(mask_us, 0.99)), masked_tokens=len(mask_us), **speeds)


def constrained_speeds(runner, prompt, new_tokens):
    """Batch-1 and batch-8 tok/s, greedy, free and under a JSON Schema that cannot end within
    new_tokens (every row runs to the end)."""
    from llama_lite import SamplingParams

    person = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}}, "required": ["name", "age", "city"]}
    endless = {"type": "array", "minItems": 100, "items": person}
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
    return speeds
