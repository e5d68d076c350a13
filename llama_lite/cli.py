"""The command-line programs: `chat`, `complete` and `serve`, run by fire with users' exit codes.

scripts/chat.py, scripts/complete.py, scripts/serve.py and the installed `llama-lite-chat`,
`llama-lite-complete`, `llama-lite-serve` all call the `*_main` functions here, so there is one
implementation of each.
Exit codes: 0 done; 2 bad input (one `error: ...` line on stderr, no traceback); 130 interrupted.
"""

import inspect
import json
import os
import signal
import sys
from pathlib import Path

import torch

from . import parallel
from .generation import Llama, check_positive_int
from .prompt_files import FileResults, StdoutResults, read_prompts
from .sampling import SamplingParams

# Flags whose value is text as typed: fire would otherwise read "None", "0x10" or "[1]" as Python
# literals (and spent gigabytes parsing a long unquoted prompt).
TEXT_FLAGS = {"prompt", "system", "prompts", "out", "checkpoint", "tokenizer", "api_key", "host"}


def run(command) -> None:
    """`fire.Fire(command)` with bad input and operating-system failures as one `error: ...` line
    and exit 2, a closed output pipe as a quiet exit (141, as SIGPIPE), Ctrl-C as 130."""
    import fire

    args = sys.argv[1:]
    if not parallel.is_main():  # under torchrun, rank 0 alone talks to the user
        sys.stdout = sys.stderr = open(os.devnull, "w")
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks close files.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        if "--help" in args[: args.index("--") if "--" in args else None] or "-h" in args[:1]:
            _show_help(command)
            return
        # Fire reads a lone "-" as its command separator; "-" here means stdin, so pick another.
        fire.Fire(command, command=_as_typed(command, args) + ["--", "--separator", "\x1f"])
        if sys.stdout is not None:
            sys.stdout.flush()  # here, where a failure can still be reported
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
        sys.exit(141)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        _fail(str(e))
    except (MemoryError, torch.OutOfMemoryError):
        _fail("out of memory; lower --max_batch_size or --max_seq_len, or pass --dtype bfloat16 or --quantize int8")
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}; check the path and the free space")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


def _fail(message: str) -> None:
    try:
        print(f"error: {message}", file=sys.stderr)
    except (OSError, AttributeError):  # stderr itself is closed or gone
        pass
    sys.exit(2)


def _show_help(command) -> None:
    """Fire's help page (each flag with its line of the docstring's Args and its default) on stdout."""
    import fire

    stderr, sys.stderr = sys.stderr, sys.stdout  # fire writes help to stderr
    try:
        fire.Fire(command, command=["--", "--help"])
    except SystemExit:
        pass
    finally:
        sys.stderr = stderr


def _as_typed(command, args) -> list:
    """The arguments for fire, with TEXT_FLAGS' values quoted as Python strings (fire unquotes
    them to exactly what was typed); an unknown --flag refused in one line (fire would print its
    whole usage text)."""
    params = inspect.signature(command).parameters
    positional = [name for name, p in params.items() if p.default is p.empty]
    switches = {name for name, p in params.items() if isinstance(p.default, bool)}  # may stand alone
    initials = [name[0] for name in params]
    short = {name[0]: name for name in params if initials.count(name[0]) == 1}  # fire's -o for --out
    typed, n_positional, i = [], 0, 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return typed + args[i:]
        if arg.startswith("-") and arg[1:2] in short and (arg[2:3] in ("", "=")):
            arg = f"--{short[arg[1]]}{arg[2:]}"
        if arg.startswith("--"):
            flag, has_value, value = arg.partition("=")
            name = flag[2:].replace("-", "_")
            if name.startswith("no") and name[2:] in switches:
                name = name[2:]
            if name not in params:
                raise ValueError(f"unknown flag {flag}; see --help for the flags")
            if has_value:
                typed.append(f"{flag}={repr(value) if name in TEXT_FLAGS else value}")
            elif name in switches or i + 1 == len(args):
                typed.append(arg)
            else:
                value = args[i + 1]
                typed += [arg, repr(value) if name in TEXT_FLAGS else value]
                i += 1
        else:
            name = positional[n_positional] if n_positional < len(positional) else None
            typed.append(repr(arg) if name in TEXT_FLAGS else arg)
            n_positional += 1
        i += 1
    return typed


def on_main(read):
    """`read()` on rank 0 alone (stdin and input files belong to it), its result on every rank; an
    error there is raised on every rank, so none waits forever."""
    result = error = None
    if parallel.is_main():
        try:
            result = read()
        except (ValueError, FileNotFoundError) as e:
            error = str(e)
    result, error = parallel.broadcast((result, error))
    if error is not None:
        raise ValueError(error)
    return result


def _check_generation_flags(**flags) -> None:
    """The sampling flags checked as the engine checks them, named as flags."""
    try:
        SamplingParams(max_tokens=flags.pop("max_gen_len"), **flags)
    except ValueError as e:
        raise ValueError(str(e).replace("SamplingParams.max_tokens", "--max_gen_len").replace("SamplingParams.", "--")) from None


def _build(max_batch_size, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile) -> Llama:
    return Llama.build(checkpoint, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
                       dtype=dtype, seed=seed, quantize=quantize, compile=compile)


# --- chat ----------------------------------------------------------------------------------------

def chat(checkpoint: str = None, tokenizer: str = None, system: str = None, prompt: str = None,
         temperature: float = 0.6, top_p: float = 0.9, top_k: int = None, presence_penalty: float = 0.0,
         frequency_penalty: float = 0.0, max_gen_len: int = 512, max_seq_len: int = None, device: str = None,
         dtype: str = None, seed: int = None, quantize: str = None, compile: bool = False):
    """Chat with a checkpoint (default: SmolLM2-135M-Instruct).

    Without --prompt: one user turn a line from stdin (a terminal or a pipe); /reset clears the
    history, /exit or EOF ends; Ctrl-C stops a reply. With --prompt: one reply, then exit.

    Args:
        checkpoint: a .gguf file, a Hugging Face folder or a Meta folder; default SmolLM2-135M-Instruct (fetched once). E.g. --checkpoint ~/models/llama-3.2-1b.gguf
        tokenizer: a tokenizer file to use instead of the checkpoint's own. E.g. --tokenizer tokenizer.json
        system: a system message that starts the conversation. E.g. --system "Answer in one sentence."
        prompt: one user message: print the reply and exit. E.g. --prompt "What is the capital of France?"
        temperature: sampling temperature; 0 is greedy. E.g. --temperature 0
        top_p: sample from the likeliest tokens holding this much probability. E.g. --top_p 0.95
        top_k: sample from this many likeliest tokens at most. E.g. --top_k 40
        presence_penalty: lower the logits of tokens already in the reply by this, once (-2..2). E.g. --presence_penalty 0.5
        frequency_penalty: lower them by this per time they occurred (-2..2); curbs loops. E.g. --frequency_penalty 0.3
        max_gen_len: the longest reply, in tokens. E.g. --max_gen_len 200
        max_seq_len: the context in tokens (history and reply); default 2048, or the model's if shorter. E.g. --max_seq_len 4096
        device: cpu, cuda or cuda:N; default cuda where there is one. E.g. --device cpu
        dtype: float32, bfloat16 or float16; default bfloat16 where the device runs it fast. E.g. --dtype float32
        seed: seed sampling, so a run repeats exactly. E.g. --seed 1
        quantize: int8 holds weights in 8 bits (a quarter of float32's memory). E.g. --quantize int8
        compile: compile the decoding step with torch.compile (faster per token, slower to start). E.g. --compile
    """
    _check_generation_flags(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, max_gen_len=max_gen_len)
    if prompt is None and sys.stdin is None:
        raise ValueError("stdin is closed; give chat a terminal or a pipe, or pass --prompt")
    llm = _build(1, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile)
    max_seq_len = llm.model.params.max_seq_len
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty)
    start = [{"role": "system", "content": system}] if system is not None else []
    # Keep room for a reply: drop the oldest turns before the history squeezes it below this.
    reply_room = min(max_gen_len, max(1, max_seq_len // 4))

    def reply(history):
        """Stream the assistant's answer to stdout and return it (history may lose its oldest turns)."""
        dropped = False
        while True:
            tokens = llm.chat_prompt_tokens(history)
            room = max_seq_len - 1 - len(tokens)
            if room >= reply_room or len(history) - len(start) <= 1:
                break
            del history[len(start) : len(start) + 2]  # the oldest user turn and its answer
            dropped = True
        if dropped:
            print("(the conversation outgrew --max_seq_len: dropped its oldest turns)", file=sys.stderr)
        if room < 1:
            raise ValueError(f"the message is too long for --max_seq_len {max_seq_len}; shorten it or raise --max_seq_len")
        pieces = []
        try:
            for piece in llm.stream(tokens, min(max_gen_len, room), **sampling):
                print(piece, end="", flush=True)
                pieces.append(piece)
        finally:
            print(flush=True)
        return "".join(pieces)

    if prompt is not None:
        reply(start + [{"role": "user", "content": prompt}])
        return
    interactive = sys.stdin.isatty()
    history = list(start)
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = on_main(sys.stdin.readline)  # Ctrl-C here ends the program (exit 130)
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            history.append({"role": "assistant", "content": reply(history)})
        except KeyboardInterrupt:  # Ctrl-C during a reply: forget the turn, back to the prompt
            history.pop()
        except ValueError as e:  # one turn too long for the context: say so, keep chatting
            history.pop()
            print(f"error: {e}", file=sys.stderr)


def chat_main():
    run(chat)


# --- complete ------------------------------------------------------------------------------------

def complete(prompts: str, out: str = None, chat: bool = False, max_gen_len: int = 64, temperature: float = 0.0,
             top_p: float = 0.9, top_k: int = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             max_batch_size: int = 8, checkpoint: str = None, tokenizer: str = None, max_seq_len: int = None,
             device: str = None, dtype: str = None, seed: int = None, quantize: str = None, compile: bool = False):
    """Complete PROMPTS (.txt, .jsonl or - for stdin) to one JSON line each, in input order, on
    stdout or in --out. With --out, finished lines go to OUT.partial at once; a finished run renames
    it to OUT, and the same command run again after an interruption continues where it stopped.

    Args:
        prompts: a .txt file (a prompt a line), a .jsonl file ({"prompt": ...} a line) or - for stdin. E.g. prompts.txt
        out: write the results to this file instead of stdout. E.g. --out results.jsonl
        chat: run each prompt as a one-turn chat through the checkpoint's chat template (instruct models); a .jsonl line may then hold "messages". E.g. --chat
        max_gen_len: the most new tokens per prompt. E.g. --max_gen_len 128
        temperature: sampling temperature; 0 is greedy. E.g. --temperature 0.7
        top_p: sample from the likeliest tokens holding this much probability. E.g. --top_p 0.95
        top_k: sample from this many likeliest tokens at most. E.g. --top_k 40
        presence_penalty: lower the logits of tokens already generated by this, once (-2..2). E.g. --presence_penalty 0.5
        frequency_penalty: lower them by this per time they occurred (-2..2). E.g. --frequency_penalty 0.3
        max_batch_size: prompts run at once (KV-cache rows). E.g. --max_batch_size 32
        checkpoint: a .gguf file, a Hugging Face folder or a Meta folder; default SmolLM2-135M-Instruct (fetched once). E.g. --checkpoint model.gguf
        tokenizer: a tokenizer file to use instead of the checkpoint's own. E.g. --tokenizer tokenizer.json
        max_seq_len: the context in tokens (prompt and generation); default 2048, or the model's if shorter. E.g. --max_seq_len 4096
        device: cpu, cuda or cuda:N; default cuda where there is one. E.g. --device cpu
        dtype: float32, bfloat16 or float16; default bfloat16 where the device runs it fast. E.g. --dtype float32
        seed: seed sampling, so a run repeats exactly. E.g. --seed 1
        quantize: int8 holds weights in 8 bits (a quarter of float32's memory). E.g. --quantize int8
        compile: compile the decoding step with torch.compile (faster per token, slower to start). E.g. --compile
    """
    _check_generation_flags(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, max_gen_len=max_gen_len)
    check_positive_int("--max_batch_size", max_batch_size)
    if not isinstance(chat, bool):
        raise ValueError(f"--chat takes no value (or True/False), got {chat!r}")
    results = StdoutResults()  # other ranks' stdout is /dev/null

    def open_results():
        nonlocal results
        if out is not None:
            results = FileResults(out, prompts)

    on_main(open_results)  # --out checked before any work
    try:
        records = on_main(lambda: read_prompts(prompts, chat))
        done = on_main(lambda: results.resume(records))  # what an earlier run of this command finished
        if done:
            print(f"continuing {out}.partial: {done} of {len(records)} prompts were done", file=sys.stderr)
        if len(records) > done:
            llm = _build(max_batch_size, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile)
            sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty)
            _write_results(llm, records[done:], results, prompts, chat, max_gen_len, sampling)
        results.finish()
    finally:
        results.close()


def _write_results(llm, todo, results, source, chat, max_gen_len, sampling):
    """Generate for each (line number, record) of `todo`, writing a result line for each in order."""
    tokens = [_prompt_tokens(llm, record, chat) for _, record in todo]
    limit = llm.model.params.max_seq_len
    for (number, _), ids in zip(todo, tokens):  # an over-long prompt reported by its line before any work
        if len(ids) + max_gen_len > limit:
            raise ValueError(f"{source} line {number}: the prompt has {len(ids)} tokens, and with --max_gen_len "
                             f"{max_gen_len} it exceeds --max_seq_len {limit}; shorten it or raise --max_seq_len")
    finished, written, empty = {}, 0, 0
    for i, result in llm.as_completed(tokens, max_gen_len, progress=True, **sampling):
        finished[i] = result["text"]
        while written in finished:  # in input order: each line once all before it are written
            text = finished.pop(written)
            results.write(json.dumps({**todo[written][1], "generation": text}, ensure_ascii=False) + "\n")
            empty += not text.strip()
            written += 1
    if not chat and llm.tokenizer.chat_template and 2 * empty >= len(todo):
        print(f"note: {empty} of {len(todo)} generations are empty; an instruct model often ends at once without its "
              "chat template: pass --chat", file=sys.stderr)


def _prompt_tokens(llm, record, chat) -> list:
    if not chat:
        return llm.tokenizer.encode(record["prompt"], bos=llm.tokenizer.add_bos, eos=False)
    if not llm.tokenizer.chat_template:
        raise ValueError("this checkpoint has no chat template; run without --chat")
    return llm.chat_prompt_tokens(record.get("messages") or [{"role": "user", "content": record["prompt"]}])


def complete_main():
    run(complete)


# --- serve ---------------------------------------------------------------------------------------

def _model_name(checkpoint) -> str:
    if checkpoint is None:
        return "SmolLM2-135M-Instruct"
    path = Path(str(checkpoint))
    return path.stem if path.suffix == ".gguf" else path.name


def _check_listen(host, port) -> None:
    """Fail fast, before loading any weights, when the address cannot be listened on."""
    import socket

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be a whole number in 0..65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(str(host), port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None


def serve(checkpoint: str = None, tokenizer: str = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str = None, max_queue: int = 64, max_batch_size: int = 8, max_seq_len: int = None,
          device: str = None, dtype: str = None, seed: int = None, quantize: str = None, compile: bool = False):
    """Serve a checkpoint over OpenAI's HTTP API (default: SmolLM2-135M-Instruct) on http://HOST:PORT/v1.

    Every client shares the engine's batch of --max_batch_size rows; up to --max_queue more requests
    wait for a row, and one more is answered 429. With --api_key, requests must send
    'Authorization: Bearer KEY'. SIGTERM or Ctrl-C ends the running requests and stops.

    Args:
        checkpoint: a .gguf file, a Hugging Face folder or a Meta folder; default SmolLM2-135M-Instruct (fetched once). E.g. --checkpoint model.gguf
        tokenizer: a tokenizer file to use instead of the checkpoint's own. E.g. --tokenizer tokenizer.json
        host: the address to listen on; 0.0.0.0 opens it to the network. E.g. --host 0.0.0.0
        port: the TCP port. E.g. --port 8080
        api_key: require 'Authorization: Bearer KEY' on every request. E.g. --api_key s3cret
        max_queue: requests that may wait for a row; more are answered 429. E.g. --max_queue 256
        max_batch_size: requests generated at once (KV-cache rows). E.g. --max_batch_size 32
        max_seq_len: the context in tokens (prompt and reply); default 2048, or the model's if shorter. E.g. --max_seq_len 4096
        device: cpu, cuda or cuda:N; default cuda where there is one. E.g. --device cpu
        dtype: float32, bfloat16 or float16; default bfloat16 where the device runs it fast. E.g. --dtype float32
        seed: seed the sampling of requests that bring no seed. E.g. --seed 1
        quantize: int8 holds weights in 8 bits (a quarter of float32's memory). E.g. --quantize int8
        compile: compile the decoding step with torch.compile (faster per token, slower to start). E.g. --compile
    """
    _check_listen(host, port)
    check_positive_int("--max_batch_size", max_batch_size)
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"--max_queue must be a whole number >= 0, got {max_queue!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("--api_key must be a non-empty string")
    if parallel.world_size() > 1:
        raise ValueError("serve runs in one process; start it without torchrun")
    llm = _build(max_batch_size, checkpoint, tokenizer, max_seq_len, device, dtype, seed, quantize, compile)
    from .server import serve as run_server

    name = _model_name(checkpoint)
    print(f"serving {name} at http://{host}:{port}/v1 ({max_batch_size} rows); Ctrl-C to stop", file=sys.stderr, flush=True)
    # uvicorn takes SIGTERM while it runs and raises it again once it has shut down: exit 0 then.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    run_server(llm, name, host=str(host), port=port, api_key=api_key, max_queue=max_queue)


def serve_main():
    run(serve)
