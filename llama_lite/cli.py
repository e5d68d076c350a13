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
import tempfile
from pathlib import Path

from . import parallel
from .generation import Llama, check_positive_int
from .sampling import check_sampling


def run(command) -> None:
    """`fire.Fire(command)` with bad input as one `error: ...` line and exit 2, Ctrl-C as 130."""
    import fire

    args = sys.argv[1:]
    if not parallel.is_main():  # under torchrun, rank 0 alone talks to the user
        sys.stdout = sys.stderr = open(os.devnull, "w")
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks remove temporary files.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        _check_flags(command, args)
        if "--" not in args:
            # Fire reads a lone "-" as its command separator; "-" here means stdin, so pick another.
            args = args + ["--", "--separator", "\x1f"]
        fire.Fire(command, command=args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


def _check_flags(command, args) -> None:
    """Refuse an unknown --flag in one line (fire would print its whole usage text)."""
    known = set(inspect.signature(command).parameters)
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("--") and arg not in ("--help",):
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown flag {arg.split('=', 1)[0]}; see --help for the flags")


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


def _check_generation_flags(temperature, top_p, top_k, max_gen_len):
    check_sampling(temperature, top_p, top_k)
    if max_gen_len is not None:
        check_positive_int("--max_gen_len", max_gen_len)


# --- chat ----------------------------------------------------------------------------------------

def chat(checkpoint=None, tokenizer=None, system=None, prompt=None, temperature=0.6, top_p=0.9, top_k=None,
         max_gen_len=None, max_seq_len=2048, device=None, dtype=None, seed=None, quantize=None, compile=False):
    """Chat with a checkpoint (default: SmolLM2-135M-Instruct).

    Without --prompt: one user turn a line from stdin (a terminal or a pipe); /reset clears the
    history, /exit or EOF ends; Ctrl-C stops a reply. With --prompt: one reply, then exit.
    """
    _check_generation_flags(temperature, top_p, top_k, max_gen_len)
    llm = Llama.build(checkpoint, tokenizer, max_seq_len=max_seq_len, max_batch_size=1, device=device, dtype=dtype, seed=seed,
                      quantize=quantize, compile=compile)
    start = [{"role": "system", "content": str(system)}] if system is not None else []
    # Keep room for a reply: drop the oldest turns before the history squeezes it below this.
    reply_room = max_gen_len or max(1, min(512, max_seq_len // 4))

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
            for piece in llm.stream(tokens, min(max_gen_len or room, room), temperature, top_p, top_k):
                print(piece, end="", flush=True)
                pieces.append(piece)
        finally:
            print(flush=True)
        return "".join(pieces)

    if prompt is not None:
        reply(start + [{"role": "user", "content": str(prompt)}])
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

def read_prompts(source) -> list:
    """(line number, {"prompt": ..., other fields}) for each non-empty line of a .txt (a prompt a
    line), a .jsonl ({"prompt": ...} a line) or "-" (stdin, a prompt a line)."""
    if source == "-":
        lines, is_jsonl = sys.stdin.read().splitlines(), False
    else:
        path = Path(str(source))
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} does not exist; pass a .txt or .jsonl file, or - for stdin")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {path} is not UTF-8 text; pass a .txt or .jsonl file") from None
        is_jsonl = path.suffix == ".jsonl"
    records, empty = [], 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            empty += 1
            continue
        if not is_jsonl:
            records.append((number, {"prompt": line}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} line {number} is not JSON ({e.msg}); write one {{\"prompt\": ...}} object a line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ValueError(f"{source} line {number} has no \"prompt\" string; write one {{\"prompt\": ...}} object a line")
        records.append((number, record))
    if empty:
        print(f"skipped {empty} empty line(s) of {source}", file=sys.stderr)
    if not records:
        raise ValueError(f"{source} holds no prompts")
    return records


def write_atomically(path: Path, text: str) -> None:
    """Write beside the target, then rename: the file appears whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def complete(prompts, out=None, max_gen_len=64, temperature=0.0, top_p=0.9, top_k=None, max_batch_size=8,
             checkpoint=None, tokenizer=None, max_seq_len=2048, device=None, dtype=None, seed=None, quantize=None,
             compile=False):
    """Complete PROMPTS (.txt, .jsonl or - for stdin) to one JSON line each, in input order, on
    stdout or atomically in --out."""
    _check_generation_flags(temperature, top_p, top_k, max_gen_len)
    check_positive_int("--max_batch_size", max_batch_size)
    if out is not None and not Path(str(out)).parent.is_dir():
        raise FileNotFoundError(f"the folder of --out {out} does not exist; create it or write elsewhere")
    records = on_main(lambda: read_prompts(prompts))
    llm = Llama.build(checkpoint, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                      device=device, dtype=dtype, seed=seed, quantize=quantize, compile=compile)
    tok = llm.tokenizer
    for number, record in records:  # report an over-long prompt by its line before any work starts
        n = len(tok.encode(record["prompt"], bos=tok.add_bos, eos=False))
        if n + max_gen_len > max_seq_len:
            raise ValueError(
                f"{prompts} line {number}: the prompt has {n} tokens, and with --max_gen_len {max_gen_len} it "
                f"exceeds --max_seq_len {max_seq_len}; shorten it or raise --max_seq_len"
            )
    done = llm.text_completion([r["prompt"] for _, r in records], max_gen_len, temperature, top_p, top_k, progress=True)
    lines = [json.dumps({**r, "generation": d["generation"]}, ensure_ascii=False) + "\n" for (_, r), d in zip(records, done)]
    if out is None:
        sys.stdout.write("".join(lines))
    elif parallel.is_main():
        write_atomically(Path(str(out)), "".join(lines))


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


def serve(checkpoint=None, tokenizer=None, host="127.0.0.1", port=8000, api_key=None, max_queue=64, max_batch_size=8,
          max_seq_len=2048, device=None, dtype=None, seed=None, quantize=None, compile=False):
    """Serve a checkpoint over OpenAI's HTTP API (default: SmolLM2-135M-Instruct) on http://HOST:PORT/v1.

    Every client shares the engine's batch of --max_batch_size rows; up to --max_queue more requests
    wait for a row, and one more is answered 429. With --api_key, requests must send
    'Authorization: Bearer KEY'. SIGTERM or Ctrl-C ends the running requests and stops.
    """
    _check_listen(host, port)
    check_positive_int("--max_batch_size", max_batch_size)
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"--max_queue must be a whole number >= 0, got {max_queue!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("--api_key must be a non-empty string")
    if parallel.world_size() > 1:
        raise ValueError("serve runs in one process; start it without torchrun")
    llm = Llama.build(checkpoint, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size, device=device,
                      dtype=dtype, seed=seed, quantize=quantize, compile=compile)
    from .server import serve as run_server

    name = _model_name(checkpoint)
    print(f"serving {name} at http://{host}:{port}/v1 ({max_batch_size} rows); Ctrl-C to stop", file=sys.stderr, flush=True)
    # uvicorn takes SIGTERM while it runs and raises it again once it has shut down: exit 0 then.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    run_server(llm, name, host=str(host), port=port, api_key=api_key, max_queue=max_queue)


def serve_main():
    run(serve)
