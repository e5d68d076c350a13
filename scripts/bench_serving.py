"""The serving case: an OpenAI-compatible server in a subprocess (llama_lite's scripts/serve.py,
llama-cpp-python's llama_cpp.server or llama.cpp's llama-server), streaming clients as asyncio tasks: all
at once (1, 8, 16, 32 clients), and arriving over time (a Poisson stream at ARRIVAL_RATE requests a
second, the same arrival times for every system)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_systems import MAX_SEQ_LEN, ROOT, build_options

SERVING_CLIENTS = (1, 8, 16, 32)
SERVING_ROUNDS = 3  # runs of each figure a server, the servers in turns: these machines drift by a third within minutes
ARRIVAL_RATE, ARRIVALS = 4.0, 48  # requests a second, and how many, in the arrivals row


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
        if proc.poll() is not None:  # e.g. llama.cpp's AMX kernels crash on some Xeons: say so, do not wait it out
            raise RuntimeError(f"{system}'s server exited with status {proc.returncode} before it answered: "
                               f"run {' '.join(map(str, cmd))} to see why")
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


async def stream_one(client, url, model, i, max_tokens):
    """One streaming completion: (start, first token, end, tokens, finish reason). Tokens come from the
    usage chunk where the server sends one (a chunk may carry several: speculation), else one a chunk."""
    body = {"model": model, "prompt": f"Once upon a time, in the city of number {i}, there lived", "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started, first, chunks, tokens, reason = time.perf_counter(), None, 0, None, None
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if not event.get("choices"):
                continue
            choice = event["choices"][0]
            if choice.get("text"):
                first = first or time.perf_counter()
                chunks += 1
            reason = choice.get("finish_reason") or reason
    return started, first, time.perf_counter(), chunks if tokens is None else tokens, reason


def run_clients(streams) -> list:
    """The streams (coroutine functions of an httpx.AsyncClient), run at once as tasks of one event loop
    in this thread, as serving benchmarks' clients run (vLLM's): a thread a client spent a third of a
    core of the 2 the servers have, on parsing and handing over the GIL."""
    import asyncio

    import httpx

    async def main():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=600) as client:
            return await asyncio.gather(*(stream(client) for stream in streams))

    return asyncio.run(main())


def percentiles(values, name) -> dict:
    """name_p50 and name_p99 of values (seconds, rounded)."""
    import statistics

    values = sorted(values) or [float("nan")]
    return {f"{name}_p50_s": round(statistics.median(values), 3),
            f"{name}_p99_s": round(values[min(len(values) - 1, int(0.99 * len(values)))], 3)}


def summary(runs, span) -> dict:
    """Aggregate tokens/s over `span` seconds, time to first token and time per token after it (p50,
    p99 over the requests), and how many streams ended without a finish reason (cut short)."""
    ttft = [(first or end) - start for start, first, end, _, _ in runs]
    per_token = [(end - first) / (tokens - 1) for _, first, end, tokens, _ in runs if first and tokens > 1]
    return {"tok_s": round(sum(r[3] for r in runs) / span, 1), **percentiles(ttft, "ttft"),
            **percentiles(per_token, "per_token"), "cut_short": sum(1 for r in runs if r[4] is None)}


def stream_clients(url, model, n_clients, max_tokens=64):
    """n_clients streaming completions at once."""
    runs = run_clients([lambda client, i=i: stream_one(client, url, model, i, max_tokens) for i in range(n_clients)])
    span = max(end for _, _, end, _, _ in runs) - min(start for start, *_ in runs)
    return {"clients": n_clients, **summary(runs, span)}


def arriving_clients(url, model, rate=ARRIVAL_RATE, n_requests=ARRIVALS, max_tokens=64):
    """n_requests streaming completions arriving as a Poisson stream of `rate` a second (seeded: the
    same times for every system)."""
    import asyncio
    import random

    gaps = random.Random(0)
    times = [0.0]
    for _ in range(n_requests - 1):
        times.append(times[-1] + gaps.expovariate(rate))
    started = time.perf_counter()

    async def one(client, i):
        await asyncio.sleep(max(0.0, started + times[i] - time.perf_counter()))
        return await stream_one(client, url, model, i, max_tokens)

    runs = run_clients([lambda client, i=i: one(client, i) for i in range(n_requests)])
    return {"clients": f"{rate:g}/s x {n_requests}", **summary(runs, max(r[2] for r in runs) - started)}


def against_the_engine(system, checkpoint, threads, rows, url, model, clients=8, pairs=8, max_tokens=64):
    """The server at `clients` streams against the same engine in this process with the same requests
    all added at once: `pairs` runs of each, taken in turns (these machines' speed drifts by a third
    within minutes, so only figures taken side by side compare). tok_s is the server's median, the
    ratio the median of each pair's."""
    import statistics

    from llama_lite import Llama, SamplingParams

    llm = Llama.build(checkpoint, max_batch_size=rows, max_seq_len=MAX_SEQ_LEN, threads=threads,
                      **build_options(system.partition(":")[2].split(":")))
    if llm.compiling is not None:  # the server waited for the same build
        llm.compiling.wait()
        llm.model.adopt_compiled_step()
    tok = llm.tokenizer

    def in_process():
        for i in range(clients):
            prompt = f"Once upon a time, in the city of number {i}, there lived"
            llm.engine.add(tok.encode(prompt, bos=tok.add_bos, eos=False), SamplingParams(temperature=0, max_tokens=max_tokens))
        started, tokens = time.perf_counter(), 0
        while llm.engine.has_unfinished():
            tokens += sum(len(out.token_ids) for out in llm.engine.step())
        return tokens / (time.perf_counter() - started)

    in_process()  # warm up
    engine, server = [], []
    for _ in range(pairs):
        engine.append(in_process())
        server.append(stream_clients(url, model, clients, max_tokens)["tok_s"])
    return {"clients": f"{clients} / in-process engine", "tok_s": round(statistics.median(server), 1),
            "engine_tok_s": round(statistics.median(engine), 1),
            "ratio": round(statistics.median(s / e for s, e in zip(server, engine)), 3), "pairs": pairs}


def serving(systems, checkpoint, threads, rows):
    """The serving rows of every system in `systems`, their servers up side by side: each figure run
    SERVING_ROUNDS times, the servers taken in turns (the first rotating), each system's run of median
    tok/s kept; then, for each llama_lite system against each other, the median of the rounds' ratios
    of tok/s; then llama_lite's server against its engine. A server that will not start is a note."""
    servers, procs = {}, []
    try:
        for system in systems:
            try:
                proc, url, model = start_server(system, checkpoint, threads, rows)
                procs.append(proc)
                servers[system] = url, model
            except RuntimeError as e:  # the table keeps the other systems' rows
                print(f"note: {e}", file=sys.stderr)
            else:
                stream_clients(*servers[system], 1, max_tokens=4)  # warm up
        order = list(servers)
        for figure in [*(lambda url, model, n=n: stream_clients(url, model, n) for n in SERVING_CLIENTS), arriving_clients]:
            runs = {system: [] for system in order}
            for round_ in range(SERVING_ROUNDS):
                for system in order[round_ % len(order):] + order[: round_ % len(order)]:
                    runs[system].append(figure(*servers[system]))
            for system, got in runs.items():
                row = {"system": system, "case": "serving", **sorted(got, key=lambda r: r["tok_s"])[len(got) // 2],
                       "rounds": len(got)}
                print(json.dumps(row), flush=True)
                yield row
            for lite in (s for s in order if s.startswith("llama_lite")):
                for other in (s for s in order if not s.startswith("llama_lite")):
                    ratios = sorted(a["tok_s"] / b["tok_s"] for a, b in zip(runs[lite], runs[other]))
                    row = {"system": lite, "case": "serving", "clients": runs[lite][0]["clients"], "against": other,
                           "tok_s_ratio": round(ratios[len(ratios) // 2], 3), "rounds": len(ratios)}
                    print(json.dumps(row), flush=True)
                    yield row
        for lite in (s for s in order if s.startswith("llama_lite")):
            row = {"system": lite, "case": "serving", **against_the_engine(lite, checkpoint, threads, rows, *servers[lite])}
            print(json.dumps(row), flush=True)
            yield row
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
