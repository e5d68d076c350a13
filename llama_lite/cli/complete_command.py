"""`complete`: a file of prompts run in batches, one JSON line each, in input order; a run that is
cut short continues where it stopped (the files' side is prompt_files.py)."""

import sys

from ..checks import check_whole
from ..engine.sampling import request_seed
from ..model import parallel
from ..prompt_records import checked_tokens, in_order, record_tokens, result_line
from .flags import build_arguments, build_llama, documented, sampling_flags
from .prompt_files import FileResults, StdoutResults, read_prompts
from .runner import on_main, run_and_exit


@documented(
    prompts='a .txt file (a prompt a line), a .jsonl file ({"prompt": ...} a line) or - for stdin. E.g. prompts.txt',
    out="write the results to this file instead of stdout. E.g. --out results.jsonl",
    chat="run each prompt as a one-turn chat through the checkpoint's chat template (instruct models); "
         'a .jsonl line may then hold "messages". E.g. --chat',
    max_gen_len="the most new tokens per prompt. E.g. --max_gen_len 128",
    max_batch_size="prompts run at once (KV-cache rows; a Ray job's: in each worker). E.g. --max_batch_size 32",
    ray="run the job on Ray Data (pip install -e \".[ray]\"): local starts a cluster here, auto or HOST:PORT "
        "joins a running one; the same file (docs/cluster.md). E.g. --ray local",
    workers="with --ray: engine workers (one Llama each), --threads split between them. E.g. --workers 4",
)
def complete(prompts: str, out: str = None, chat: bool = False, max_gen_len: int = 64, temperature: float = 0.0,
             top_p: float = 0.9, top_k: int = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             max_batch_size: int = 8, checkpoint: str = None, tokenizer: str = None, max_seq_len: int = None,
             device: str = None, dtype: str = None, seed: int = None, quantize: str = None, compile: bool = None,
             no_prefix_cache: bool = False, json_schema: str = None, regex: str = None, chat_template: str = None,
             threads: int = None, speculative: str = "auto", ray: str = None, workers: int = None):
    """Complete PROMPTS (.txt, .jsonl or - for stdin) to one JSON line each, in input order, on
    stdout or in --out. With --out, finished lines go to OUT.partial at once; a finished run renames
    it to OUT, and the same command run again after an interruption continues where it stopped.
    Prompt K samples with seed --seed + K, so a resumed sampled run equals an uninterrupted one.
    With --ray, --workers engines on a Ray cluster run the prompts and write the same file.
    """
    sampling = sampling_flags(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                              frequency_penalty=frequency_penalty, max_gen_len=max_gen_len, json_schema=json_schema,
                              regex=regex)
    check_whole("--max_batch_size", max_batch_size, 1)
    if not isinstance(chat, bool):
        raise ValueError(f"--chat takes no value (or True/False), got {chat!r}")
    job = ray_job(ray, workers, max_gen_len)
    results = StdoutResults()  # other ranks' stdout is /dev/null

    def open_results():
        nonlocal results
        if out is not None and out != "-":  # "-": stdout, as for the prompts
            results = FileResults(out, prompts)

    on_main(open_results)  # --out checked before any work
    try:
        records = on_main(lambda: read_prompts(prompts, chat))
        done = on_main(lambda: results.resume(records))  # what an earlier run of this command finished
        if done:
            print(f"continuing {out}.partial: {done} of {len(records)} prompts were done", file=sys.stderr)
        if len(records) > done and job:
            build = build_arguments(max_batch_size, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize,
                                    compile, no_prefix_cache, chat_template, None, speculative)
            job(records, done, results, threads=threads, max_batch_size=max_batch_size, max_gen_len=max_gen_len,
                sampling=sampling, seed=seed, chat=chat, build=build)
        elif len(records) > done:
            llm = build_llama(max_batch_size, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile,
                              no_prefix_cache, chat_template, threads, speculative)
            if seed is not None:  # prompt K samples with seed + K, however the run was cut
                sampling["seed"] = request_seed(seed, done)
            _write_results(llm, records, done, results, prompts, chat, max_gen_len, sampling)
        results.finish()
    finally:
        results.close()


def ray_job(ray, workers, max_gen_len):
    """With --ray: the job's runner (cluster/job.py) bound to its cluster and workers, flags checked
    before any work; None without. Ray is imported only here, only when asked for."""
    if ray is None:
        if workers is not None:
            raise ValueError("--workers needs --ray (a job on a Ray cluster); add --ray local, or leave --workers out")
        return None
    if parallel.world_size() > 1:
        raise ValueError("--ray runs its own workers; start it without torchrun")
    if max_gen_len is None:
        raise ValueError("--ray needs a number for --max_gen_len; e.g. --max_gen_len 128")
    workers = 1 if workers is None else workers
    check_whole("--workers", workers, 1)
    from ..cluster.job import run_job
    from ..cluster.ray_connect import check_address, import_ray

    address = check_address(ray)
    import_ray("ray.data")  # a missing extra is named before any work
    return lambda *args, **kwargs: run_job(*args, address=address, workers=workers, **kwargs)


def complete_main():
    run_and_exit(complete)


def _write_results(llm, records, done, results, source, chat, max_gen_len, sampling):
    """Generate for each (line number, record) of records[done:], writing a result line for each in
    order. --max_gen_len None: up to the context's end for the longest prompt of all (resumed or not)."""
    todo, limit = records[done:], llm.model.params.max_seq_len
    if max_gen_len is None:
        lengths = [len(record_tokens(llm, record, chat)) for _, record in records]
        longest = max(range(len(records)), key=lambda i: lengths[i])
        max_gen_len = max(1, limit - 1 - lengths[longest])
    tokens = []
    for number, record in todo:  # a prompt that cannot run is reported by its line before any work
        try:
            tokens.append(checked_tokens(llm, record, chat, max_gen_len))
        except ValueError as e:
            raise ValueError(f"{source} line {number}: {e}") from None
    empty = 0
    for i, result in in_order(llm.as_completed(tokens, max_gen_len, progress=True, **sampling)):
        results.write(result_line(todo[i][1], result["text"]))
        empty += not result["text"].strip()
    if not chat and llm.tokenizer.chat_template and 2 * empty >= len(todo):
        print(f"note: {empty} of {len(todo)} generations are empty; an instruct model often ends at once without its "
              "chat template: pass --chat", file=sys.stderr)

