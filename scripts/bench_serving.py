"""The serving case: an OpenAI-compatible server in a subprocess (llama_lite's scripts/serve.py,
llama-cpp-python's llama_cpp.server or llama.cpp's llama-server), streaming clients in threads."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_systems import MAX_SEQ_LEN, ROOT, build_options

SERVING_CLIENTS = (1, 8, 32)


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
            "ttft_p50_s": round(statistics.median(ttft), 2),
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 2),
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

