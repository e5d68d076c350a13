"""A batch job on Ray Data: a prompt file's records run by a pool of BatchCompleter actors, the result
lines written in input order by this process (the driver) as they come back (docs/cluster.md).

The file is plain `complete`'s: the driver hands each row its index, so it samples with seed + index;
rows come back in any order and are written once all before them are, so OUT.partial is always a
prefix that the same command resumes from. A worker killed mid-job is restarted by Ray and its rows
rerun (max_restarts, max_task_retries); rows are keyed by index, so each is written once."""

import json
import logging
import sys
import time

from ..prompt_records import in_order, result_line
from .batch import BatchCompleter
from .ray_connect import connect, for_workers, import_ray, split_threads

PROGRESS_EVERY_S = 2.0


def run_job(records, done, results, address: str, workers: int, threads, max_batch_size: int, max_gen_len: int,
            sampling: dict, seed, chat: bool, build: dict, completer=BatchCompleter) -> None:
    """Run records[done:] ((line number, record) pairs) on a Ray cluster with `workers` actors, each a
    Llama built with `build` (and max_batch_size, its share of threads), writing each result line to
    `results` (FileResults or StdoutResults) in input order. `completer`: the actor class."""
    each = split_threads(threads, workers)
    started = time.perf_counter()
    took = connect(address, num_cpus=max(split_threads(None, 1), workers * each))
    ray = import_ray()
    data = import_ray("ray.data")
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    data.DataContext.get_current().enable_progress_bars = False  # the job's own progress line is enough
    print(f"ray: {'joined' if address != 'local' else 'started'} a cluster in {took or 0:.1f} s; {workers} workers of "
          f"{each} thread(s)", file=sys.stderr, flush=True)
    rows = [_row(k, record) for k, (_, record) in enumerate(records) if k >= done]
    constructor = {"max_gen_len": max_gen_len, "seed": seed, "chat": chat, "sampling": sampling,
                   **for_workers(build, address), "max_batch_size": max_batch_size, "threads": each}
    # Ray Data restarts a dead actor and retries its batches by default (max_restarts, max_task_retries -1).
    # A batch is a worker's KV-cache rows: the work is shared out finely and each batch's rows return
    # (and reach OUT.partial) as soon as it ends.
    dataset = data.from_items(rows).map_batches(
        completer, compute=data.ActorPoolStrategy(size=workers), num_cpus=each, batch_size=max_batch_size,
        batch_format="numpy", fn_constructor_kwargs=constructor)
    progress = Progress(len(records), done, workers, ray)
    try:
        for k, (generation, error, n_tokens) in in_order(_results(dataset), start=done):
            results.write(result_line(records[k][1], generation, error))
            progress.row(n_tokens)
        progress.show(force=True)
    finally:
        print(f"ray: the job took {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        if took is not None:  # a cluster this call connected to is let go now, while the interpreter is whole
            ray.shutdown()  # (left to exit after SIGTERM, Ray's threads abort the process)


def _row(index: int, record: dict) -> dict:
    """A record as a row of the job: its index, its prompt, its messages as JSON text ("" without)."""
    messages = json.dumps(record["messages"]) if "messages" in record else ""
    return {"index": index, "prompt": record.get("prompt", ""), "messages": messages}


def _results(dataset):
    """(index, (generation, error, tokens generated)) of every row, as Ray Data hands them back."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for index, generation, error, tokens in zip(batch["index"], batch["generation"], batch["error"], batch["tokens"]):
            yield int(index), (str(generation), str(error) or None, len(tokens))


class Progress:
    """rows done, tokens/s and workers alive on stderr, every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int, done: int, workers: int, ray):
        self.total, self.done, self.workers, self.ray = total, done, workers, ray
        self.tokens, self.start, self.last = 0, time.perf_counter(), 0.0

    def row(self, n_tokens: int) -> None:
        self.done += 1
        self.tokens += n_tokens
        self.show()

    def show(self, force=False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = self.tokens / max(now - self.start, 1e-9)
        print(f"{self.done}/{self.total} rows, {rate:.1f} tokens/s, {self.alive()} workers alive", file=sys.stderr, flush=True)

    def alive(self) -> str:
        """The BatchCompleter actors Ray holds alive now ('?' where the cluster does not say)."""
        try:
            from ray._private.state import actors

            return str(sum(a["State"] == "ALIVE" and "MapWorker" in a.get("ActorClassName", "") for a in actors().values()))
        except Exception:
            return "?"
