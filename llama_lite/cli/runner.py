"""Running a command under fire as users expect of a program: flags read as typed, bad input as one
`error: ...` line and exit 2 (no traceback), a closed output pipe as a quiet exit, Ctrl-C as 130.
Under torchrun, rank 0 alone reads input and talks to the user (`on_main`).
"""

import atexit
import inspect
import os
import re
import signal
import sys

import torch

from ..model import parallel

# Flags whose value is text as typed: fire would otherwise read "None", "0x10" or "[1]" as Python
# literals (and spent gigabytes parsing a long unquoted prompt).
TEXT_FLAGS = {"prompt", "system", "prompts", "out", "checkpoint", "tokenizer", "api_key", "host", "json_schema", "regex",
              "chat_template"}


def run_and_exit(command) -> None:
    """A program's entry point: `run(command)`, then exit at once (`_exit_now`)."""
    try:
        run(command)
        status = 0
    except SystemExit as e:
        status = e.code
    _exit_now(status)


def _exit_now(status) -> None:
    """Exit without the interpreter's teardown: unloading torch alone takes 0.5-1 s on 2 cores, which a
    one-shot chat or a Ctrl-C would otherwise wait for after its last word. What the teardown does
    that matters here is done first: atexit callbacks (torchrun's process groups) and the last
    flush of stdout and stderr. Files are closed by then (`with` and `finally`), threads joined."""
    if isinstance(status, str):  # sys.exit("message"): the message, exit 1
        print(status, file=sys.stderr)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status if isinstance(status, int) else 0 if status is None else 1)


def run(command) -> None:
    """`fire.Fire(command)` with bad input and operating-system failures as one `error: ...` line
    and exit 2, a closed output pipe as a quiet exit (141, as SIGPIPE), Ctrl-C as 130 (SystemExit)."""
    import fire

    args = sys.argv[1:]
    if not parallel.is_main():  # under torchrun, rank 0 alone talks to the user
        sys.stdout = sys.stderr = open(os.devnull, "w")
    sys.stderr = _BestEffortStderr(sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks close files.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        if "--help" in args or args == ["-h"]:
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
        _fail(in_flag_terms(str(e), command))
    except (MemoryError, torch.OutOfMemoryError):
        _fail("out of memory; lower --max_batch_size or --max_seq_len, or pass --dtype bfloat16 or --quantize int8")
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}; check the path and the free space")
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)


class _BestEffortStderr:
    """stderr for progress bars and notes, which are never worth the results: closed (2>&-) or
    full, it drops what it cannot write instead of raising (or print() falling back to stdout)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text) if self.stream is not None else len(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self):
        try:
            if self.stream is not None:
                self.stream.flush()
        except (OSError, ValueError):
            pass

    def isatty(self):
        return self.stream is not None and self.stream.isatty()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def in_flag_terms(message: str, command) -> str:
    """A library message as the command line says it: device='cpu' is --device cpu, dtype=None is no
    --dtype, max_seq_len is --max_seq_len, "quantize must be" is "--quantize must be", and choices
    read as typed: "'int4', 'int8' or None" is "int4 or int8, or leave the flag out"."""
    flags = set(inspect.signature(command).parameters)

    def flag(match):
        if match.group(1) not in flags:
            return match.group(0)
        return f"no --{match.group(1)}" if match.group(3) == "None" else f"--{match.group(1)} {match.group(3)}"

    message = re.sub(r"(?<!-)\b(\w+)=(['\"]?)([\w.:-]+)\2", flag, message)
    for name in flags:
        if "_" in name:
            message = re.sub(rf"(?<![-\w]){name}\b", f"--{name}", message)
    message = re.sub(r"^(unknown )?(\w+)(?= must be| '| is empty)",
                     lambda m: f"{m.group(1) or ''}--{m.group(2)}" if m.group(2) in flags else m.group(0), message)
    message = re.sub(r"\bor None for\b", "or leave the flag out for", message)
    return re.sub(_CHOICES, _choices_as_typed, message)


# A list of choices as the library writes them: "'a', 'b' or 'c'", "'a', 'b' or None" (then maybe ", got").
_CHOICES = re.compile(r"((?:'[\w.:-]+', )*'[\w.:-]+') or (None|'[\w.:-]+')(, got\b)?")


def _choices_as_typed(match) -> str:
    """Choices as a user types them: "a, b or c"; None (no flag) as "a or b, or leave the flag out; got"."""
    choices = re.findall(r"'([\w.:-]+)'", match.group(1))
    got = match.group(3) or ""
    if match.group(2) != "None":
        return _one_of(choices + [match.group(2).strip("'")]) + got
    return _one_of(choices) + ", or leave the flag out" + got.replace(",", ";")


def _one_of(choices) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
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
    them to exactly what was typed). Anything fire would read loosely is refused in one line: an
    unknown flag (fire would print its whole usage), a flag without its value (fire would pass
    True), an argument too many (fire would take it as the next parameter, such as --out)."""
    params = inspect.signature(command).parameters
    positional = [name for name, p in params.items() if p.default is p.empty]
    switches = {name for name, p in params.items() if isinstance(p.default, bool)} | {"compile"}  # may stand alone
    initials = [name[0] for name in params if name not in positional]
    short = {name[0]: name for name in params if name not in positional and initials.count(name[0]) == 1}  # fire's -o
    typed, given, i = [], set(), 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-") and arg[1:2] in short and arg[2:3] in ("", "="):
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
            elif name in switches:
                typed.append(arg)
            elif i + 1 == len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"{flag} needs a value, such as {flag}=VALUE; see --help")
            else:
                value = args[i + 1]
                typed += [arg, repr(value) if name in TEXT_FLAGS else value]
                i += 1
            given.add(name)
        else:
            missing = [name for name in positional if name not in given]
            if not missing:
                raise ValueError(f"unexpected argument {arg!r}; flags start with -- (see --help)")
            typed += [f"--{missing[0]}", repr(arg) if missing[0] in TEXT_FLAGS else arg]
            given.add(missing[0])
        i += 1
    for name in positional:
        if name not in given:
            raise ValueError(f"{name.upper()} is missing; see --help")
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
