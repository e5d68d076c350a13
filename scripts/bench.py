"""Side-by-side speed of llama_lite, transformers and llama.cpp on one checkpoint (default: the
SmolLM2-135M-Instruct Q4_1 GGUF), greedy, end-of-sequence ignored, same prompts and thread count.

    python scripts/bench.py                                  # every system that imports
    python scripts/bench.py --systems llama_lite:bfloat16 --n_prompts 32

Each system runs in fresh processes (so its load time and peak memory are its own) and prints
one JSON line per case; the parent prints a table of the ratios issue 8 asks for and the
fraction of the memory-bandwidth ceiling each batch-1 decode reaches. A system whose package is not
installed is skipped with a note (transformers needs `accelerate`; llama.cpp `llama-cpp-python`).

Cases: load (build on a cached file, then the first token), decode_b1 (128 new tokens, one sequence) with
peak RSS after it (a one-row cache), decode_b8 (8 sequences, aggregate tokens/s), mixed (--n_prompts
prompts of 5-300 tokens, 64 new tokens each: llama_lite with continuous batching over --mixed_batch_size
rows, transformers in batches of 8, llama.cpp one by one), and serving (1, 8, 16 and 32 concurrent
streaming clients of an OpenAI-compatible server, 64 tokens each, then Poisson arrivals: llama_lite's
scripts/serve.py with --mixed_batch_size rows, llama-cpp-python's `llama_cpp.server` with
--interrupt_requests False, or llama.cpp's own llama-server, all up at once and each figure taken three
times with the servers in turns; aggregate tokens/s, time to first token p50/p99, streams cut short,
llama_lite's ratio to each other server; for llama_lite also the server at 8 clients against its engine
in process, taken in turns), and constrained (llama_lite only; structured output over tests/schemas.json:
each schema's compile time, the per-token mask cost p50/p99 replaying sampled outputs, and batch-1 /
batch-8 tok/s of a JSON Schema that cannot end within --new_tokens against the same requests
unconstrained), and spec_grounded / spec_chat / spec_mixed (llama_lite only; speculative decoding off
against "auto" and "ngram" on one model, batch 1 and 8: copying a ~500-token document, free chat
questions, and the 256 mixed prompts on 8 rows: decoding tok/s, speedup, tokens a guessing step).
llama_lite systems are named llama_lite[:DTYPE][:int8|int4][:compile|nocompile]: plain `llama_lite` is
the default configuration (what chat.py and serve.py run without flags). stream_b1 is batch 1 through the
engine (`Llama.stream`, what chat.py and one server client use); startup times a first start with an
empty llama_lite cache and a second one with it filled: load -> first streamed token, and when the
compiled decode step ran (the first start waits for its compile process). The table names the path each
llama_lite system runs and why (measured, or asked for).

`--device cuda --shape smollm2|llama1b` runs random-weight checkpoints of those shapes, written by
transformers into a temporary folder (no weights need to travel), llama_lite against transformers
on the GPU. The table is headed by the CPU's instruction sets (or the GPU's name): figures from
different kinds of machine are not comparable.

Prefix caching, llama_lite alone, its cache on against off in one process (two engines over one
model): prefix_chat (a 10-turn chat with a ~1,000-token system prompt, 32-token replies: time to
first token of each turn) and prefix_shared (64 requests sharing a 1,000-token prefix with 50-token
tails, 16 new tokens each, 16 rows: end to end); each with the hit rate, the index's host memory and
whether the tokens came out the same.

This file is the parent (it runs each system's cases in a fresh `python scripts/bench.py
--worker_for=SYSTEM` and prints the table); beside it: bench_systems.py (the runners and the
checkpoints), bench_cases.py (a worker's cases), bench_levers.py (prefix caching and speculation),
bench_prompts.py, bench_serving.py (the server and its streaming clients), bench_table.py.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_cases import worker
from bench_levers import PREFIX_CASES, PREFIX_ROWS, SPEC_CASES, SPEC_ROWS
from bench_serving import serving
from bench_systems import ALL_SYSTEMS, random_checkpoint
from bench_table import machine, table

CASES = ("load", "decode_b1", "stream_b1", "decode_b8", "mixed", "serving", "startup", "prefix_chat", "prefix_shared",
         "constrained", "spec_grounded", "spec_chat", "spec_mixed")

def importable(name) -> bool:
    module = {"llama_lite": "llama_lite", "transformers": "accelerate", "llama_cpp": "llama_cpp",
              "llama_cpp_server": "llama_cpp.server.app"}[name]
    found = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return found.returncode == 0 and (name != "transformers" or subprocess.run(
        [sys.executable, "-c", "import transformers"], capture_output=True).returncode == 0)


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
    """Two starts of `system`: with an empty llama_lite cache (no path measured, no compiled step),
    then with what the first one (and its compile process) left there."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="llama_lite_bench_") as cache:
        for state in ("cold", "warm"):
            env = {"LLAMA_LITE_CACHE": cache, "LLAMA_LITE_BENCH_CACHE": state}
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
    rows, serving_systems = [], []
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
        if "serving" in cases and name == "llama_lite":
            serving_systems.append(system)
        elif "serving" in cases and name == "llama_cpp":
            server = llama_server or shutil.which("llama-server")
            if server is None:
                print("note: skipping llama.cpp serving: no llama-server (pass --llama_server PATH)", file=sys.stderr)
            else:
                serving_systems.append(f"llama_server:{server}")
    if serving_systems:
        print(f"running {', '.join(serving_systems)}: serving side by side ({threads} threads)...", file=sys.stderr)
        rows += list(serving(serving_systems, checkpoint, threads, mixed_batch_size))
    return rows


if __name__ == "__main__":
    import fire

    fire.Fire(main)
